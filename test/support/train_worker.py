"""One torchrun rank of the distributed training test: train, then dump this rank's full parameters.

    python -m torch.distributed.run --nproc_per_node 2 --standalone test/support/train_worker.py \
        [--stop-at STEP] CONFIG.yaml key=value ...

Writes OUTPUT_DIR/params-rank{R}.safetensors (every parameter, gathered in full under FSDP) so the test
can check that all ranks ended with the same model. --stop-at ends the run early with a resumable
checkpoint, as if the job had been killed there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from robometer_ros.training.recipe.config import load_config
from robometer_ros.training.recipe.trainer import Trainer


def main() -> int:
    torch.set_num_threads(1)
    args = sys.argv[1:]
    stop = None
    if args[0] == "--stop-at":
        stop, args = int(args[1]), args[2:]
    config = load_config(args[0], args[1:])
    trainer = Trainer(config)
    trainer.train(stop_at_step=stop)
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(Path(config.output_dir) / f"params-rank{trainer.env.rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
