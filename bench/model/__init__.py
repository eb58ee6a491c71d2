"""Models: which model a name means (registry, shipped configs), its architecture described as data
(arch), building it with random weights (build), the training step (train), what autograd keeps per
layer (probe) and the routing of mixtures of experts (moe). registry and arch import no torch."""
