"""The headline figures on one device, each ours against its peer or floor in the same run, into one JSON:
MoE layer (8 x top-2 and 64 x top-8) against the dense floor and transformers' Mixtral experts; a PEER training
step against PEER-pytorch with AdamW; a Mixture-of-Depths model against its dense twin (training step and
batch-1 decoding); training tokens/s of each debug preset through the trainer.

    python benchmarks/gpu/headline.py --device cuda --out results.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mixturelm.bench.moe import _moe_contenders
from mixturelm.bench.peer import _peer_contenders, optimizer_for, train_step
from mixturelm.bench.timing import fwd_bwd


def timed(fn, device: str, steps: int, rounds: int = 3) -> float:
    """Median seconds of fn over rounds of `steps` calls, after a warm-up call, synchronising the device."""
    fn()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def moe_layers(device: str, tokens: int, steps: int) -> dict:
    out = {}
    for shape, (n_experts, top_k, d_hidden) in {"8x top-2": (8, 2, 1408), "64x top-8": (64, 8, 352)}.items():
        torch.manual_seed(0)
        x = torch.randn(1, tokens, 512, device=device, requires_grad=True)
        grad = torch.randn(1, tokens, 512, device=device)
        rows = {}
        for name, build in _moe_contenders(n_experts, top_k, d_hidden, 512).items():
            try:
                rows[name] = timed(fwd_bwd(build().to(device), x, grad), device, steps)
            except Exception as e:  # noqa: BLE001 (a peer's implementation missing on this device: say so)
                rows[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        floor = rows["dense floor"]
        out[shape] = {n: {"fwd_bwd_s": t, "x_dense_floor": t / floor} if isinstance(t, float) else t
                      for n, t in rows.items()}
    return out


def peer_step(device: str, tokens: int, n_experts: int, steps: int) -> dict:
    shape = {"tokens": tokens, "d_model": 256, "n_experts": n_experts, "heads": 8, "top_k": 16, "d_key": 128}
    torch.manual_seed(0)
    x = torch.randn(1, tokens, 256, device=device, requires_grad=True)
    grad = torch.randn(1, tokens, 256, device=device)
    rows = {}
    for name, build in _peer_contenders(shape).items():
        try:
            module = build().to(device)
            rows[name] = {"train_step_s": timed(train_step(module, optimizer_for(name, module), x, grad), device, steps)}
            del module
        except Exception as e:  # noqa: BLE001
            rows[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"shape": shape, "contenders": rows}


def mod_model(device: str, seq_len: int, steps: int) -> dict:
    from mixturelm.bench.mod import _mod_models
    from mixturelm.generate import generate

    models = {name: m.to(device) for name, m in _mod_models(seq_len, 0.125).items()}
    batch = torch.randint(0, 257, (2, seq_len + 1), device=device)
    out = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            model(batch[:, :-1], batch[:, 1:]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.train()
        train_s = timed(step, device, steps)
        model.eval()
        decode_s = timed(lambda model=model: generate(model, batch[:1, :16], max_new_tokens=32, temperature=0.0),
                         device, 1)
        out[name] = {"train_step_s": train_s, "decode_tok_per_s_batch1": 32 / decode_s}
    out["MoD speed-up, training"] = out["dense"]["train_step_s"] / out["MoD"]["train_step_s"]
    out["MoD speed-up, decoding batch 1"] = out["MoD"]["decode_tok_per_s_batch1"] / out["dense"]["decode_tok_per_s_batch1"]
    return out


def trainer_throughput(device: str, steps: int) -> dict:
    from mixturelm.training import Trainer, new_run_config

    out = {}
    for preset in ("dense-debug", "moe-debug", "mod-debug", "peer-debug"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = new_run_config(preset, {"max_steps": steps, "eval_every": steps, "eval_tokens": 2048})
            Trainer(cfg, Path(tmp) / "run", device=device, progress=False, log=lambda m: None).run()
            records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            rates = [r["tok_per_s"] for r in records if r["kind"] == "train"][steps // 2:]
            out[preset] = {"tok_per_s": statistics.median(rates)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="small sizes, to try the script without a GPU")
    args = ap.parse_args()
    quick = args.quick
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
            or platform.machine(), "torch": torch.__version__, "quick": quick,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results = {"machine": info}
    for name, run in (("moe_layer", lambda: moe_layers(args.device, 256 if quick else 16384, 2 if quick else 10)),
                      ("peer_train_step", lambda: peer_step(args.device, 64 if quick else 2048,
                                                            64 * 64 if quick else 1024 * 1024, 1 if quick else 5)),
                      ("mod_model", lambda: mod_model(args.device, 64 if quick else 1024, 1 if quick else 5)),
                      ("trainer", lambda: trainer_throughput(args.device, 4 if quick else 40))):
        t0 = time.perf_counter()
        results[name] = run()
        results[name + "_wall_s"] = time.perf_counter() - t0
        print(name, json.dumps(results[name], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
