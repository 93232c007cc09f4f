"""Many inference requests at once, for the batching and generation tests."""
import threading


def concurrently(rt, requests):
    """rt.inference.infer of every request at once (released together by a barrier); each slot
    holds the response or the exception it raised."""
    out, barrier = [None] * len(requests), threading.Barrier(len(requests))

    def call(i):
        barrier.wait()
        try:
            out[i] = rt.inference.infer(requests[i])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
