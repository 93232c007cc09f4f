// The JS SDK against a live server: node --test sdk/js/ with MSC_BASE_URL and MSC_API_KEY set
// (tests/test_e2e.py starts the server and runs this).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { MSmartComputeClient, MSmartComputeError } from './msmartcompute.mjs';

const baseUrl = process.env.MSC_BASE_URL;
const apiKey = process.env.MSC_API_KEY;

test('every endpoint through the JS SDK', { skip: !baseUrl }, async () => {
  const client = new MSmartComputeClient(`${baseUrl}/api/v1`, apiKey);
  assert.equal((await client.health()).status, 'healthy');

  const loaded = await client.loadModel({
    model_id: 'js-mlp', model_type: 'mlp',
    parameters: { input_size: 3, hidden_sizes: [5], output_size: 2 },
  });
  assert.equal(loaded.model_id, 'js-mlp');
  assert.deepEqual(['success', 'error', 'timestamp'].filter((k) => k in loaded), []);  // no envelope
  assert.ok((await client.listModels()).some((m) => m.model_id === 'js-mlp'));
  assert.equal((await client.getModel('js-mlp')).model_type, 'mlp');

  const result = await client.inference('js-mlp', [[0.1, 0.2, 0.3]]);
  assert.equal(result.output_data.length, 1);
  assert.equal(result.output_data[0].length, 2);

  const queued = await client.inferenceAsync('js-mlp', [[0.1, 0.2, 0.3]]);
  const done = await client.wait(queued.request_id, { timeoutMs: 30000 });
  assert.deepEqual(done.output_data, result.output_data);

  const batch = await client.batchInference([
    { model_id: 'js-mlp', input_data: [[0.1, 0.2, 0.3]] },
    { model_id: 'js-mlp', input_data: [[0.4, 0.5, 0.6]] },
  ]);
  assert.equal(batch.results.length, 2);

  const session = await client.createSession('admin', 'js-mlp');
  assert.equal((await client.getSession(session.session_id)).model_id, 'js-mlp');
  await client.endSession(session.session_id);

  const metrics = await client.metrics();
  assert.ok(metrics.total_requests >= 1);
  assert.ok(Array.isArray(await client.metricsHistory({ interval: 1 })));

  const alloc = await client.allocateResources('admin', 1024, 1, 60);
  assert.ok((await client.listAllocations()).some((a) => a.allocation_id === alloc.allocation_id));
  assert.equal((await client.getAllocation(alloc.allocation_id)).memory_size, 1024);
  await client.deallocateResources(alloc.allocation_id);

  const vgpu = await client.createVirtualGpu('js-vgpu', 1 << 20, 1);
  assert.equal(vgpu.status, 'active');
  assert.ok((await client.listVirtualGpus()).some((v) => v.virtual_gpu_id === 'js-vgpu'));
  assert.equal((await client.getVirtualGpu('js-vgpu')).memory_size, 1 << 20);
  await client.destroyVirtualGpu('js-vgpu');

  await assert.rejects(client.inference('missing', [[1]]),
    (err) => err instanceof MSmartComputeError && err.code === 'INVALID_MODEL_ID' && err.status === 404);
  await client.unloadModel('js-mlp');
});

test('a bad key is refused with UNAUTHORIZED', { skip: !baseUrl }, async () => {
  const client = new MSmartComputeClient(`${baseUrl}/api/v1`, 'msc_0_notarealkeynotarealkey');
  await assert.rejects(client.listModels(), (err) => err.code === 'UNAUTHORIZED' && err.status === 401);
});

test('training and optimization through the JS SDK', { skip: !baseUrl }, async () => {
  const client = new MSmartComputeClient(`${baseUrl}/api/v1`, apiKey);
  await client.loadModel({
    model_id: 'js-train', model_type: 'mlp',
    parameters: { input_size: 2, hidden_sizes: [16], output_size: 2 },
  });
  const x = Array(4).fill([[-1, -1], [-1.2, -0.8], [1, 1], [0.9, 1.1]]).flat();
  const y = Array(4).fill([0, 0, 1, 1]).flat();
  const sync = await client.train('js-train', x, y, { epochs: 40, learning_rate: 0.05 });
  assert.equal(sync.epochs_completed, 40);
  assert.ok(sync.final_loss < sync.loss_history[0]);

  const queued = await client.trainAsync('js-train', x, y, { epochs: 10 });
  const seen = [];
  const done = await client.wait(queued.request_id, { kind: 'training', timeoutMs: 60000, onProgress: (r) => seen.push(r) });
  assert.equal(done.status, 'completed');
  assert.equal(done.loss_history.length, 10);
  assert.deepEqual((await client.getTraining(queued.request_id)).loss_history, done.loss_history);

  await assert.rejects(client.train('js-train', x, y.slice(0, 3)),
    (err) => err.code === 'INVALID_INPUT_DATA' && err.details.field === 'labels');
  const opt = await client.optimizeModel('js-train', {
    optimization_type: 'quantization', target_precision: 'int8', calibration_data: x,
  });
  assert.ok(opt.model_updated);
  assert.ok(opt.compression_ratio < 1);
  const out = await client.inference('js-train', x);
  assert.deepEqual(out.output_data.map((r) => (r[1] > r[0] ? 1 : 0)), y);

  await client.unloadModel('js-train');
});

test('timeouts, AbortSignal and connection errors are typed', async () => {
  const { createServer } = await import('node:http');
  const silent = createServer(() => {});  // accepts, never answers
  await new Promise((resolve) => silent.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${silent.address().port}/api/v1`;
  try {
    await assert.rejects(new MSmartComputeClient(url, undefined, { timeoutMs: 200 }).health(),
      (err) => err instanceof MSmartComputeError && err.code === 'REQUEST_TIMEOUT' && err.status === undefined);
    const controller = new AbortController();
    const call = new MSmartComputeClient(url).withOptions({ signal: controller.signal }).listModels();
    setTimeout(() => controller.abort(), 50);
    await assert.rejects(call, (err) => err.code === 'ABORTED');
  } finally {
    silent.closeAllConnections();
    silent.close();
  }
  // the port is closed now: nothing listens there
  await assert.rejects(new MSmartComputeClient(url, undefined, { timeoutMs: 5000 }).health(),
    (err) => err.code === 'CONNECTION_FAILED');
});
