"""What a front process may ask of the engine process: "service.method" on the Runtime
(Runtime.operation). One list for both ends (serving/engine_server.py, serving/engine_client.py);
nothing else is reachable. No torch here: front processes import it."""

OPERATIONS = frozenset({
    "registry.load", "registry.list", "registry.get", "registry.unload",
    "inference.infer", "inference.infer_stream", "inference.infer_batch", "inference.submit", "inference.get",
    "inference.chat_prompt",
    "training.train", "training.submit", "training.get", "training.cancel",
    "optimization.optimize",
    "sessions.create", "sessions.get", "sessions.delete",
    "allocations.allocate", "allocations.get", "allocations.list", "allocations.deallocate",
    "vgpus.create", "vgpus.describe", "vgpus.list", "delete_vgpu",
    "health", "metrics", "metrics_history", "list_jobs",
})
