"""One-off: the GPU forward ceiling of the all-MiniLM-L6-v2 architecture (docs/scaling.md's cost model).

``python -m benchmarks.gpu_forward`` on a machine with CUDA. Builds BertModel with all-MiniLM-L6-v2's
shape (6 layers, hidden 384, 12 heads, FFN 1536) with random weights — the weights do not change the
arithmetic — and times forward + mean pooling + normalization on random token ids of 256 tokens (the
pipeline's chunks are ~240 model tokens), per dtype and batch size. Tokenization and host transfers are
left out: this is the ceiling of one GPU, not an end-to-end figure. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import time

import torch
from transformers import BertConfig, BertModel

SHAPE = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
         "intermediate_size": 1536, "max_position_embeddings": 512}  # fmt: skip
SEQ = 256


def main() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        model = BertModel(BertConfig(**SHAPE)).cuda().to(dtype).eval()
        for batch in (64, 256, 1024):
            ids = torch.randint(1000, 30000, (batch, SEQ), device="cuda")
            mask = torch.ones_like(ids)
            with torch.inference_mode():
                for _ in range(3):  # warm-up: kernels, allocator
                    model(input_ids=ids, attention_mask=mask)
                torch.cuda.synchronize()
                rounds = max(20, 40000 // batch)
                started = time.perf_counter()
                for _ in range(rounds):
                    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                    torch.nn.functional.normalize(pooled, dim=1)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - started
            print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": str(dtype),
                              "batch": batch, "seq": SEQ, "chunks_per_s": round(rounds * batch / seconds),
                              "tokens_per_s": round(rounds * batch * SEQ / seconds)}))  # fmt: skip


if __name__ == "__main__":
    main()
