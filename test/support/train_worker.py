"""One torchrun rank of the distributed training test: train, then dump this rank's full parameters.

    python -m torch.distributed.run --nproc_per_node 2 --standalone test/support/train_worker.py \
        CONFIG.yaml key=value ...

Writes OUTPUT_DIR/params-rank{R}.safetensors (every parameter, gathered in full under FSDP) so the test
can check that all ranks ended with the same model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from robometer_ros.training.config import load_config
from robometer_ros.training.trainer import Trainer


def main() -> int:
    torch.set_num_threads(1)
    config = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(config)
    trainer.train()
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(Path(config.output_dir) / f"params-rank{trainer.env.rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
