"""Quick start: convert the embedded PBMC sample, verify it, and load a few batches.

Run from the repository root after installing (see README):
    python examples/quickstart.py [--output DIR]
"""

from __future__ import annotations

import argparse
import time

from scmf_loader import CellDataLoader, CellDataset
from scmf_shards.convert import convert_h5ad
from scmf_shards.demo import demo_h5ad_path
from scmf_shards.verify import dataset_info, format_info, verify_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo-dataset", help="dataset directory to write")
    args = parser.parse_args()

    source = demo_h5ad_path()
    print(f"1. converting {source.name} (559 real PBMC cells, 10x counts) -> {args.output}")
    t = time.perf_counter()
    convert_h5ad([source], args.output, shard_size=200, overwrite=True, quiet=True)
    print(f"   done in {time.perf_counter() - t:.1f} s\n")
    print(format_info(dataset_info(args.output)), "\n")

    problems = verify_dataset(args.output)
    print(f"2. verify: {problems if problems else 'OK, every checksum holds'}\n")

    dataset = CellDataset(args.output)
    item = dataset[0]
    print(f"3. one cell: {item['n_genes']} expressed genes, metadata {item['metadata']}")
    loader = CellDataLoader(dataset, batch_size=64, num_workers=0, output="padded", max_genes=512, seed=0)
    print(f"   {len(loader)} padded batches per epoch (batch 64, max_genes 512)")
    for i, batch in enumerate(loader):
        if i == 3:
            break
        print(
            f"   batch {i}: gene_indices {tuple(batch['gene_indices'].shape)}, "
            f"expression {tuple(batch['expression'].shape)}, "
            f"attention_mask {int(batch['attention_mask'].sum())} real tokens"
        )
    csr = next(iter(CellDataLoader(dataset, batch_size=128, num_workers=0, output="csr")))
    print(f"   a CSR batch: {csr}")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
