from bench.cell import env


def test_git_commit_override_wins_over_the_checkout(monkeypatch):
    """A tree copied to a GPU machine may carry a stale .git: the commit named by the caller wins."""
    monkeypatch.setenv("FTMEM_GIT_COMMIT", "abc1234")
    monkeypatch.setenv("FTMEM_GIT_DIRTY", "0")
    assert env.git_commit() == ("abc1234", False)
    monkeypatch.setenv("FTMEM_GIT_DIRTY", "1")
    assert env.git_commit() == ("abc1234", True)


def test_git_commit_of_this_checkout(monkeypatch):
    monkeypatch.delenv("FTMEM_GIT_COMMIT", raising=False)
    commit, dirty = env.git_commit()
    assert commit is None or len(commit) == 40


def test_env_records_the_gpus_a_cell_was_given(monkeypatch):
    """A 2-GPU cell on a 4-GPU host says which GPUs it had; unrestricted is null."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert env.collect(cuda_runtime="13.0")["cuda_visible_devices"] == "2,3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert env.collect(cuda_runtime="13.0")["cuda_visible_devices"] is None
