"""Virtual GPUs: POST/GET /virtualization/gpus, GET/DELETE /virtualization/gpus/{virtual_gpu_id}."""
from __future__ import annotations

from .envelope import ok
from .schemas import VirtualGpu, parse


class VirtualGpusResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        body = parse(req, VirtualGpu)
        resp.media = ok(self.runtime.vgpus.create(body, req.context.caller))

    def on_get(self, req, resp):
        resp.media = ok({"virtual_gpus": self.runtime.vgpus.list()})


class VirtualGpuResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp, virtual_gpu_id):
        resp.media = ok(self.runtime.vgpus.describe(virtual_gpu_id))

    def on_delete(self, req, resp, virtual_gpu_id):
        resp.media = ok(self.runtime.delete_vgpu(virtual_gpu_id, req.context.caller))
