"""Training on several processes and devices (torch.distributed, launched by torchrun).

- `group`: the process group (joining, leaving, the collectives the trainer uses), which mode a run is in;
- `data`: data parallelism (every rank the whole model, each module's gradients averaged);
- `mesh`: where a process sits (pipeline stage, data replica) and which modules each stage holds;
- `pipeline`: the local modules as pipeline stages, trained at once (the stage trainer, stage cotangents);
- `pipelined_bp`: the baseline, end-to-end backprop pipelined over the same stages (1F1B);
- `cost`: each module's measured cost and the throughput model, which the planner and the stage partition use.
"""
