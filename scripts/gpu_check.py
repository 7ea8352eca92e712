"""The CUDA half of livetrain's weight sharing, on a machine with a GPU.

What `livetrain serve` does on a GPU, without vLLM: one process (standing in for vLLM)
holds a model's weights on the GPU and publishes CUDA IPC handles of them; a second
process (the training worker) maps the handles, builds the Hugging Face model on views
of them, and takes a context-frozen APOLLO-Mini step. Checked:

1. the worker's parameters are the mapped memory (same device pointers; no copy);
2. the worker's in-place step is seen by the first process (its tensors changed, and
   its forward pass gives the worker's new logits);
3. a torn step is undone from the step undo the worker keeps beside the handles;
4. memory: what mapping and the step allocate in the worker.

    .venv/bin/python scripts/gpu_check.py [--dtype bfloat16] [--out bench/results/gpu_check.json]

Needs torch with CUDA and transformers; no model files (a small Llama is built from a
config). Exits 2 on a machine without a GPU. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from livetrain.weights import Layout, ParamLayout, ParamSlice, export_cuda_tensor, publish_handles  # noqa: E402
from livetrain.formats.dtypes import dtype_name  # noqa: E402

CONTEXT = list(range(10, 74))
CONTINUATION = list(range(200, 216))


def small_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                       tie_word_embeddings=True)


def identity_layout(model: torch.nn.Module) -> Layout:
    """One handle per Hugging Face tensor (vLLM's merging is checked on CPU by the tests)."""
    params = {name: ParamLayout(name, tuple(p.shape), dtype_name(p.dtype),
                                (ParamSlice(name, (0, p.shape[0]), (0, p.shape[0])),))
              for name, p in model.named_parameters()}
    return Layout(params, {name: tuple(p.shape) for name, p in model.named_parameters()})


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([CONTEXT + CONTINUATION], device="cuda")).logits[0, -1].float()


def owner(args: argparse.Namespace) -> dict:
    """The weights' owner: export, let the worker train, check what it sees."""
    torch.manual_seed(0)
    config = small_llama_config()
    model = __import__("transformers").LlamaForCausalLM(config).to("cuda", getattr(torch, args.dtype)).eval()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    config.save_pretrained(work / "model")
    handles = {name: export_cuda_tensor(p.data) for name, p in model.named_parameters()}
    weights_dir = Path(f"/dev/shm/livetrain-gpu-check-{work.name}")
    publish_handles(weights_dir, work / "model", identity_layout(model), handles)
    q_name = "model.layers.0.self_attn.q_proj.weight"
    q_before = model.get_parameter(q_name).detach().clone()
    logits_before = logits(model)
    try:
        child = subprocess.run([sys.executable, __file__, "--worker", str(work / "model"), str(weights_dir)],
                               capture_output=True, text=True, timeout=600)
        if child.returncode != 0:
            raise SystemExit(f"the worker process failed:\n{child.stdout}\n{child.stderr}")
        seen = json.loads(child.stdout.strip().splitlines()[-1])
        q_after = model.get_parameter(q_name).detach()
        logits_after = logits(model)
        return {
            **seen,
            "owner_sees_the_update": not torch.equal(q_before, q_after),
            "owner_q_proj_sum": float(q_after.float().sum()),
            "owner_logits_match_worker": bool(torch.allclose(logits_after.cpu(), torch.tensor(seen["logits_after"]),
                                                             atol=1e-3, rtol=1e-3)),
            "owner_logits_changed": not torch.equal(logits_before, logits_after),
        }
    finally:
        import shutil

        shutil.rmtree(weights_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def worker(model_dir: Path, weights_dir: Path) -> dict:
    """The training worker's side: map, train one step, report."""
    from transformers import AutoConfig

    from livetrain.optim import apollo_mini, apollo_param_groups
    from livetrain.train.data import SFTExample
    from livetrain.train.step import StepOptions, train_step
    from livetrain.weights import model_on_views, open_shared_copy
    from livetrain.weights.step_undo import StepUndo, undo_torn_step

    torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated()
    layout, tensors = open_shared_copy(weights_dir)
    model = model_on_views(AutoConfig.from_pretrained(model_dir), layout, tensors)
    allocated_mapped = torch.cuda.memory_allocated()
    views = all(p.data_ptr() == tensors[name].data_ptr() for name, p in model.named_parameters())
    optimizer = apollo_mini(apollo_param_groups(model, r"self_attn\.q_proj", other="frozen",
                                                embeddings="frozen"), lr=1e-3)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    undo = StepUndo(trained, weights_dir)
    undo.begin(1)
    result = train_step(model, optimizer, [SFTExample(tuple(CONTEXT), tuple(CONTINUATION))], StepOptions(),
                        before=undo.saved)
    undo.end(kept_state=b"step 1")
    torch.cuda.synchronize()
    q = model.get_parameter("model.layers.0.self_attn.q_proj.weight")
    after_step = q.detach().clone()
    # A torn second step: one tensor written, then "the process dies"; the next mapper undoes it.
    undo.begin(2)
    with torch.no_grad():
        q.add_(1.0)
    torn = undo_torn_step(weights_dir, dict(model.named_parameters()))
    return {
        "views_not_copies": views,
        "step_applied": result.applied,
        "loss": result.loss,
        "update_norm": result.update_norm,
        "step_seconds": result.seconds,
        "torn_step_undone": torn is not None and torch.equal(q.detach(), after_step),
        "worker_q_proj_sum": float(q.detach().float().sum()),
        "logits_after": logits(model).cpu().tolist(),
        "mapping_allocated_bytes": allocated_mapped - allocated_before,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() - allocated_before,
        "weights_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "device": torch.cuda.get_device_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "WEIGHTS_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        raise SystemExit(2)
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), Path(args.worker[1]))))
        return
    report = owner(args)
    checks = ["views_not_copies", "step_applied", "owner_sees_the_update", "owner_logits_changed",
              "owner_logits_match_worker", "torn_step_undone"]
    report["q_proj_sums_agree"] = abs(report["owner_q_proj_sum"] - report["worker_q_proj_sum"]) < 1e-3
    checks.append("q_proj_sums_agree")
    print(f"device: {report['device']}")
    for check in checks:
        print(f"{check:<28} {'ok' if report[check] else 'FAILED'}")
    mib = 2 ** 20
    print(f"{'weights (mapped, not copied)':<28} {report['weights_bytes'] / mib:.1f} MiB")
    print(f"{'allocated by mapping':<28} {report['mapping_allocated_bytes'] / mib:.1f} MiB")
    print(f"{'peak allocated by the step':<28} {report['peak_allocated_bytes'] / mib:.1f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({k: v for k, v in report.items() if k != "logits_after"}, indent=2))
    raise SystemExit(0 if all(report[c] for c in checks) else 1)


if __name__ == "__main__":
    main()
