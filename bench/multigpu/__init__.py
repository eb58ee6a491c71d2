"""Cells of several GPUs: the torchrun launch from the parent (launch), one rank's measurement under DDP,
FSDP2 or DeepSpeed ZeRO (dist), and the DeepSpeed config generated from the spec."""
