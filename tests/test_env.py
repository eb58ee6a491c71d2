from bench import env


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
