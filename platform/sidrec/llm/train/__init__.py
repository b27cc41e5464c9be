"""Supervised fine-tuning of the SID-extended LM on Ray Train (DDP or DeepSpeed ZeRO-2/3, optional LoRA).

The worker (`worker.train_loop_per_worker`) is assembled from one module per phase:

- `setup`: the worker's environment (rank, device, strategy) and the model + optimizer (DDP or DeepSpeed).
- `data`: instruction rows -> tokenised examples, the step plan, the per-epoch shard and micro-batches.
- `restore`: training state, weights, optimizer and scheduler from the latest Ray Train checkpoint.
- `fit`: one epoch of optimizer steps.
- `validate`: validation loss (all ranks) and the cheap next-item HR@10 / NDCG@10 check (rank 0).
- `checkpoint`: the per-epoch checkpoint folder, reported to Ray Train.

`driver` runs the `TorchTrainer` on the driver and reads its result; `plot` draws ``loss_curve.png``.
The stages that call them are `sidrec.stages.instructions`, `sidrec.stages.base_model` and
`sidrec.stages.model`.

Checkpoint layout (one folder per epoch, merged by Ray from every worker's upload)::

    state.json          epochs done, global step, metric history, loss log, world size, strategy
    model/              HF save_pretrained (LoRA merged), tokenizer: plain from_pretrained loads it
    optimizer.pt        DDP only (rank 0): optimizer + scheduler state
    adapter/            LoRA only: the PEFT adapter, to resume LoRA training
    ds/<tag>/...        DeepSpeed only: engine.save_checkpoint (module, optimizer partitions, scheduler)

Fault tolerance: with ``train.max_failures >= 1`` a worker that dies is restarted with the whole group
from the latest checkpoint (`ray.train.get_checkpoint()` restores weights, optimizer, scheduler, epoch).
"""
