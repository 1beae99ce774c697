"""`torchrun ... -m dft_megatron.train [Megatron-LM flags] --loss-type dft`: DFT on
Megatron-LM's trainer. See dft_megatron/training/entry.py and README.md.

Nothing is imported at module level: the checkpoint writer's multiprocessing manager (started
with "spawn" by Megatron-Core's torch_dist save) re-imports this module as `__mp_main__`, and
an import of the trainer there costs every rank's first save the seconds of importing torch
and Megatron-Core once more."""

if __name__ == "__main__":
    import sys

    from dft_megatron.training.entry import main

    sys.exit(main())
