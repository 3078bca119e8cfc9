"""`latte train`: Latte training from the latent cache or raw videos, with exact resume and data
parallelism (msrun).

- trainer.config      TrainConfig, the schema of configs/training/*.yaml
- trainer.data        which entries qualify, how a clip is read, the GeneratorDataset source
- trainer.draws       the deterministic sample order by global position, the batch layout
- trainer.optim       AdamW with torch semantics (fused kernel), EMA, lr schedule, fp16 loss scale
- trainer.step        TrainStep: the compiled loss / gradient / update step
- trainer.checkpoint  atomic, checksummed checkpoints; `--resume auto` finds the newest valid one
- trainer.resume      which checkpoint a run continues from, whether it fits the config, loading it back
- trainer.logs        log.jsonl and the loss-curve PNG
- trainer.train       set-up, the loop and the saves; `main(argv)` (the `latte train` subcommand)

Modules are imported on use: `latte --help` must not wait for MindSpore.
"""
