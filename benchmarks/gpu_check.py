"""Check on one GPU that siamese trains on JAX with no TensorFlow, and measure its speed there (under 5 minutes).

    bash benchmarks/gpu_wheels.sh     # once, on a machine with PyPI: keras and the wheels it lacks into .whl/
    # then on the GPU machine (jax with CUDA; no TensorFlow, no Keras, no internet needed):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    KERAS_BACKEND=jax OUT=results python3 benchmarks/gpu_check.py [--seconds 30]
    KERAS_BACKEND=jax .venv/bin/python benchmarks/gpu_check.py --allow-cpu --seconds 3   # a smoke run on the CPU

1. Environment: python, jax, jaxlib, keras, numpy versions, the devices JAX sees and whether TensorFlow is
   installed (and, in the report's `tensorflow_loaded`, whether anything imported it by the end).
2. JAX sees a GPU (without `--allow-cpu` the run stops here otherwise).
3. `siamese.training.train` trains small_cnn on scikit-learn's digits (28 px, 2 epochs, the test images as
   validation) on JAX: the manifest's precision is mixed_bfloat16 on the GPU, every loss is finite and the
   validation precision@1 and MAP@R after the last epoch beat the untrained network's (epoch 0).
4. Training images per second of small_cnn at 28 px and mobilenet_v2 at 224 px (random weights), batch 256
   (8 for mobilenet_v2 on the CPU), the batch-all supcon loss, mixed_bfloat16 on the GPU: Keras's own
   compiled train step on one batch kept on the device, timed for `--seconds` after the compile.
5. Model FLOP utilisation: FLOPs per training image from XLA's cost analysis of that train step (the HLO as
   lowered, before XLA's optimisations), achieved FLOP/s over the device's dense bf16 peak (H100/H200 SXM
   989e12; none for other kinds or the CPU).

Every figure and check goes into one JSON report, printed at the end and written to $OUT/gpu_check.json when
OUT is set; the exit status is 1 when a check fails. Put the figures in README.md with the date and the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_FLOPS = (  # dense bf16 tensor-core peaks, first match of the device kind wins
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),  # H200 SXM and GH200
    ("H100", 989e12),  # H100 SXM (device kind "NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
)
THROUGHPUT_MODELS = (("small_cnn", 28), ("mobilenet_v2", 224))
CPU_MOBILENET_BATCH = 8  # depthwise convolutions train slowly on XLA's CPU backend
IMAGES_PER_ITEM = 4  # K of the synthetic P x K throughput batch


def importable(name: str) -> bool:
    """Whether module `name` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def environment() -> dict[str, Any]:
    """Step 1: versions, the devices JAX sees and whether TensorFlow is installed."""
    import jax
    import jaxlib
    import keras
    import numpy as np

    plugins = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                     if (d.metadata["Name"] or "").lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm")))
    devices = [{"id": d.id, "platform": d.platform, "device_kind": d.device_kind} for d in jax.devices()]
    result = {
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "jax_plugins": plugins, "keras": keras.__version__, "numpy": np.__version__,
        "keras_backend": keras.backend.backend(), "jax_backend": jax.default_backend(), "devices": devices,
        "tensorflow_installed": importable("tensorflow"),
        "checks": {"keras_backend_is_jax": keras.backend.backend() == "jax"},
    }
    for key in ("python", "jax", "jaxlib", "jax_plugins", "keras", "numpy", "keras_backend", "jax_backend",
                "tensorflow_installed"):
        print(f"  {key:22s} {result[key]}")
    for d in devices:
        print(f"  device {d['id']:<15d} {d['platform']} {d['device_kind']}")
    return result


def gpu_visible() -> dict[str, Any]:
    """Step 2: the first device JAX sees is a GPU."""
    import jax

    device = jax.devices()[0]
    print(f"  jax.devices()[0]: {device.platform} {device.device_kind}")
    return {"platform": device.platform, "device_kind": device.device_kind,
            "checks": {"gpu": device.platform == "gpu"}}


def number(x: Any) -> str:
    """`x` to 4 decimals when it is a number."""
    return f"{x:.4f}" if isinstance(x, int | float) else str(x)


def train_digits(work: Path, epochs: int, on_gpu: bool) -> dict[str, Any]:
    """Step 3: `siamese.training.train` on the digits catalog, on JAX, and what its history and manifest say."""
    from siamese.checkpoint import sidecar
    from siamese.config import TrainConfig
    from siamese.datasets import make_dataset
    from siamese.training import train

    folder = work / "digits"
    make_dataset("digits", folder, progress=False)
    out = work / "digits.keras"
    config = TrainConfig(labeled_data=str(folder / "train.json"), image_dir=str(folder),
                         val_labeled_data=str(folder / "test.json"), out=str(out), epochs=epochs, image_size=28,
                         backend="jax", tensorboard="none")
    start = time.perf_counter()
    result = train(config, verbose=2)
    seconds = time.perf_counter() - start
    manifest = json.loads(sidecar(out, "manifest").read_text())
    history = result.history
    untrained, last = history[0].get("val_precision_at_1"), history[-1].get("val_precision_at_1")
    map_untrained, map_last = history[0].get("val_map_at_r"), history[-1].get("val_map_at_r")
    losses = [h[k] for h in history[1:] for k in ("loss", "val_loss") if k in h]
    checks = {
        "trained_every_epoch": len(history) == epochs + 1,
        "losses_finite": bool(losses) and all(isinstance(x, int | float) and math.isfinite(x) for x in losses),
        "precision_at_1_improved": untrained is not None and last is not None and last > untrained,
        "map_at_r_improved": map_untrained is not None and map_last is not None and map_last > map_untrained,
    }
    if on_gpu:
        checks["mixed_bfloat16"] = manifest.get("precision") == "mixed_bfloat16"
    print(f"  {seconds:.1f} s, precision {manifest.get('precision')}; validation precision@1 {number(untrained)} "
          f"untrained, {number(last)} after {epochs} epochs; MAP@R {number(map_untrained)}, {number(map_last)}")
    return {"train_seconds": round(seconds, 2), "precision": manifest.get("precision"), "epochs": epochs,
            "image_size": 28, "val_precision_at_1_untrained": untrained, "val_precision_at_1_trained": last,
            "val_map_at_r_untrained": map_untrained, "val_map_at_r_trained": map_last,
            "best_epoch": result.best_epoch, "monitor": result.monitor, "best": result.best, "history": history,
            "manifest": manifest, "checks": checks}


def synthetic_batch(batch: int, image_size: int, seed: int = 0) -> tuple[Any, Any]:
    """Random uint8 images of batch // 4 items x 4 images, and the P x K batch's `y_true`
    (`siamese.losses.targets.pack_relations` of its relations: 1 another image of its item, 0 an image of
    another item, -1 itself), both on the default device."""
    import jax
    import numpy as np

    from siamese.losses.targets import pack_relations

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    items = np.arange(batch) // IMAGES_PER_ITEM
    relation = (items[:, None] == items[None, :]).astype(np.float32)
    np.fill_diagonal(relation, -1.0)
    y = pack_relations(np.arange(batch), relation)
    return jax.device_put(images), jax.device_put(y)


def keras_train_step(model) -> tuple[Callable, str]:
    """The jitted train step that Keras built for `model` (after a `train_on_batch`), else an equal new one."""
    import jax

    step = inspect.getclosurevars(model.train_function).nonlocals.get("step_function")
    if hasattr(step, "lower"):
        return step, "Keras's own jitted train step"
    return jax.jit(model.train_step, donate_argnums=0), "jax.jit(model.train_step) (Keras's step not found)"


def flops(lowered) -> float | None:
    """The 'flops' of an XLA cost analysis (a dict, or a list of one dict in older jax), None when absent."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    value = (analysis or {}).get("flops")
    return float(value) if value else None


def peak_flops(device_kind: str, policy: str) -> tuple[float | None, str]:
    """The device's dense bf16 peak FLOP/s from `PEAK_BF16_FLOPS`, and a note on where it came from."""
    if policy != "mixed_bfloat16":
        return None, f"no peak for {policy} on {device_kind}"
    for kind, peak in PEAK_BF16_FLOPS:
        if kind.lower() in device_kind.lower():
            return peak, f"dense bf16 peak of {kind}"
    return None, f"no peak known for {device_kind!r}: add it to PEAK_BF16_FLOPS"


def throughput(backbone: str, image_size: int, batch: int, seconds: float, policy: str) -> dict[str, Any]:
    """Step 4 and 5 for one model: training images per second of Keras's compiled train step on one batch kept
    on the device, and its FLOPs per image from XLA's cost analysis."""
    import jax
    import keras

    from siamese.losses import BatchSupConLoss
    from siamese.models import build_batch_all, build_embedding

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        embedding = build_embedding(backbone, image_size, 128, "none")
        model = build_batch_all(embedding)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=BatchSupConLoss(0.1), jit_compile=True)
        x, y = synthetic_batch(batch, image_size)
        start = time.perf_counter()
        first_loss = float(model.train_on_batch(x, y))  # builds the model and optimizer, compiles the step
        compile_seconds = time.perf_counter() - start
        step, step_source = keras_train_step(model)
        state = tuple([v.value for v in variables] for variables in (
            model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
            model.metrics_variables))
        data = (x, y, None)  # as Keras passes it, so the compiled step is reused

        logs, state = step(state, data)
        jax.block_until_ready((logs, state))
        start = time.perf_counter()
        logs, state = step(state, data)
        jax.block_until_ready((logs, state))
        chunk = max(1, min(100, round(0.5 / (time.perf_counter() - start))))  # steps between clock readings
        steps, start = 0, time.perf_counter()
        while True:
            for _ in range(chunk):
                logs, state = step(state, data)
            jax.block_until_ready((logs, state))
            steps += chunk
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        mean_loss = float(logs["loss"])
        per_second = steps * batch / elapsed

        analysis_start = time.perf_counter()
        lowered = step.lower(state, data)
        train_flops = flops(lowered)
        try:
            compiled_flops = flops(lowered.compile())
        except Exception as e:  # cost analysis is best effort on some backends
            compiled_flops = None
            print(f"  compiled cost analysis failed: {type(e).__name__}: {e}")
        forward = jax.jit(lambda t, n, images: embedding.stateless_call(t, n, images, training=True)[0])
        shapes = [[jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables]  # the step donated the values
                  for variables in (embedding.trainable_variables, embedding.non_trainable_variables)]
        forward_flops = flops(forward.lower(*shapes, x))
        if train_flops:
            per_image, flops_source = train_flops / batch, "XLA cost analysis of the lowered train step (per image)"
        elif forward_flops:
            per_image, flops_source = 3 * forward_flops / batch, "3 x XLA cost analysis of the embedding's forward"
        else:
            per_image, flops_source = None, "no XLA cost analysis"
        analysis_seconds = time.perf_counter() - analysis_start
        memory = jax.devices()[0].memory_stats() or {}
    finally:
        keras.config.set_dtype_policy(previous)
    print(f"  {backbone} {image_size} px, batch {batch}, {policy}: {per_second:,.1f} images/s "
          f"({steps} steps in {elapsed:.1f} s, compile {compile_seconds:.1f} s, mean loss {mean_loss:.4f})")
    return {
        "backbone": backbone, "image_size": image_size, "batch_size": batch, "policy": policy,
        "parameters": embedding.count_params(), "compile_seconds": round(compile_seconds, 2),
        "cost_analysis_seconds": round(analysis_seconds, 2), "steps": steps,
        "timed_seconds": round(elapsed, 3), "images_per_second": per_second, "first_loss": first_loss,
        "mean_loss": mean_loss, "train_step": step_source, "flops_per_image": per_image, "flops_source": flops_source,
        "train_step_flops_per_image_lowered": train_flops / batch if train_flops else None,
        "train_step_flops_per_image_compiled": compiled_flops / batch if compiled_flops else None,
        "forward_flops_per_image": forward_flops / batch if forward_flops else None,
        "peak_bytes_in_use": memory.get("peak_bytes_in_use"),
        "checks": {"loss_finite": math.isfinite(first_loss) and math.isfinite(mean_loss), "ran": per_second > 0},
    }


def throughputs(seconds: float, batch: int, on_gpu: bool) -> dict[str, Any]:
    """Step 4: `throughput` of each of THROUGHPUT_MODELS."""
    from siamese.distribute import placement

    policy = placement("jax").precision  # what train uses on these devices
    results, notes = {}, []
    for backbone, size in THROUGHPUT_MODELS:
        model_batch = batch
        if not on_gpu and backbone == "mobilenet_v2" and batch > CPU_MOBILENET_BATCH:
            model_batch = CPU_MOBILENET_BATCH
            notes.append(f"{backbone} at batch {model_batch}, not {batch}, on the CPU")
        results[backbone] = throughput(backbone, size, model_batch, seconds, policy)
    checks = {f"{name}_{check}": ok for name, r in results.items() for check, ok in r.pop("checks").items()}
    return {"policy": policy, "seconds": seconds, "notes": notes, "models": results, "checks": checks}


def utilisation(models: dict[str, Any], device_kind: str) -> dict[str, Any]:
    """Step 5: model FLOP utilisation of each measured model, achieved FLOP/s over the device's peak."""
    results = {}
    for name, r in models.items():
        peak, note = peak_flops(device_kind, r["policy"])
        achieved = r["images_per_second"] * r["flops_per_image"] if r["flops_per_image"] else None
        mfu = achieved / peak if achieved and peak else None
        results[name] = {"flops_per_image": r["flops_per_image"], "flops_source": r["flops_source"],
                         "achieved_flops_per_second": achieved, "peak_flops_per_second": peak, "peak_note": note,
                         "mfu": mfu}
        gflops = f"{r['flops_per_image'] / 1e9:.3f} GFLOP/image" if r["flops_per_image"] else "no FLOPs"
        achieved_text = f"{achieved / 1e12:.3g} TFLOP/s" if achieved else "-"
        print(f"  {name}: {gflops}, {achieved_text}, MFU {f'{mfu:.1%}' if mfu is not None else '-'} ({note})")
    return {"models": results, "checks": {f"{n}_flops": r["flops_per_image"] is not None for n, r in results.items()}}


def run_step(report: dict[str, Any], name: str, title: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one step, print its title and outcome, and file its figures (or its error) in `report`."""
    print(f"\n== {len(report['steps']) + 1}. {title}", flush=True)
    start = time.perf_counter()
    try:
        result = fn()
        result["passed"] = all(result.get("checks", {}).values())
    except Exception as e:
        result = {"passed": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(result["traceback"], end="", file=sys.stderr)
    result["step_seconds"] = round(time.perf_counter() - start, 2)
    failed = [k for k, ok in result.get("checks", {}).items() if not ok]
    why = (f"; failed: {', '.join(failed)}" if failed else "") + (f"; {result['error']}" if "error" in result else "")
    print(f"  -> {'pass' if result['passed'] else 'FAIL'} in {result['step_seconds']:.1f} s{why}", flush=True)
    report["steps"][name] = result
    return result


def finish(report: dict[str, Any], start: float) -> int:
    """Total the report, print it, write it to $OUT/gpu_check.json when OUT is set; the exit status."""
    report["tensorflow_loaded"] = "tensorflow" in sys.modules
    report["passed"] = all(s["passed"] for s in report["steps"].values())
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2, default=str)
    print("\n" + text)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_check.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"wrote {path}")
    print(f"\n{'PASS' if report['passed'] else 'FAIL'} in {report['total_seconds']:.0f} s on {report['device']}")
    return 0 if report["passed"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke run of this script)")
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds of each throughput model")
    parser.add_argument("--batch-size", type=int, default=256, help="images per throughput batch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the digits training")
    parser.add_argument("--skip", nargs="*", default=[], choices=("train", "throughput"), help="steps to leave out")
    args = parser.parse_args()
    if os.environ["KERAS_BACKEND"] != "jax":
        parser.error(f"KERAS_BACKEND={os.environ['KERAS_BACKEND']}: this check runs on JAX; unset it or set it to jax")

    start = time.perf_counter()
    import jax

    import siamese

    device = jax.devices()[0]
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.device_kind, "platform": device.platform, "allow_cpu": args.allow_cpu,
        "argv": sys.argv[1:], "siamese": siamese.__version__, "steps": {},
    }
    report["versions"] = {k: v for k, v in run_step(report, "environment", "Environment", environment).items()
                          if k in ("python", "jax", "jaxlib", "jax_plugins", "keras", "numpy")}
    gpu = run_step(report, "gpu", "JAX sees a GPU", gpu_visible)
    on_gpu = gpu.get("checks", {}).get("gpu", False)
    if not on_gpu:
        if not args.allow_cpu:
            print(f"\nerror: JAX sees no GPU, only {jax.devices()}. Install jax with its CUDA plugin "
                  "(jax[cuda13]) and check nvidia-smi; or pass --allow-cpu for a smoke run on the CPU.",
                  file=sys.stderr)
            return finish(report, start)
        gpu["passed"], gpu["note"] = True, "no GPU: --allow-cpu"
    if "train" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="siamese-gpu-check-") as work:
            run_step(report, "train", f"siamese.training.train: small_cnn on digits, {args.epochs} epochs, JAX",
                     lambda: train_digits(Path(work), args.epochs, on_gpu))
    if "throughput" not in args.skip:
        speed = run_step(report, "throughput", f"Training images per second, {args.seconds:g} s each",
                         lambda: throughputs(args.seconds, args.batch_size, on_gpu))
        if "models" in speed:
            run_step(report, "mfu", "Model FLOP utilisation", lambda: utilisation(speed["models"], device.device_kind))
    return finish(report, start)


if __name__ == "__main__":
    sys.exit(main())
