"""torchrun entry of tests/test_cuda.py: test_distributed's scenarios trained by NCCL ranks, one GPU each.

    python -m torch.distributed.run --nproc_per_node 2 tests/nccl_ranks.py OUT_DIR NAME [NAME ...]
"""
import sys

from mdistiller_lakd.engine import distributed
from test_distributed import train_on_this_rank


def main(out_dir: str, names: list[str]) -> None:
    device = distributed.init_distributed()  # NCCL on cuda:LOCAL_RANK, as tools/train.py joins
    try:
        train_on_this_rank(out_dir, names, device)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
