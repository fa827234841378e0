"""A vLLM worker class whose ``load_model`` bypasses both runner and worker classes sinkguard wraps,
as an out-of-tree platform's worker might: used to show that ``sinkguard serve`` refuses to serve
when a worker runs without the detector (``--worker-cls unobserved_worker.UnobservedWorker``)."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker


class UnobservedWorker(CPUWorker):
    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader import get_model

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model = get_model(vllm_config=self.vllm_config)
