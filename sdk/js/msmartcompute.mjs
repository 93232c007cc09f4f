// MSmartCompute JavaScript SDK: the seed's MSmartComputeClient with every endpoint.
// No dependencies (fetch: Node 20+ or a browser). Errors throw MSmartComputeError carrying the
// API's code (CONNECTION_FAILED when no answer came, REQUEST_TIMEOUT when timeoutMs passed,
// ABORTED when the caller's AbortSignal fired); a 429 is retried after Retry-After; wait()
// polls an async job until it ends. Methods return the answer's fields without the envelope
// (success, error, timestamp); the list methods return the list; as the Python SDK does.
// Types: msmartcompute.d.mts.

export class MSmartComputeError extends Error {
  constructor(code, message, details = {}, status = undefined) {
    super(`${code}: ${message}`);
    this.name = 'MSmartComputeError';
    this.code = code;
    this.details = details;
    this.status = status;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const ENVELOPE = new Set(['success', 'error', 'timestamp']);
const withoutEnvelope = (payload) => Object.fromEntries(Object.entries(payload).filter(([k]) => !ENVELOPE.has(k)));
const enc = encodeURIComponent;
const trainingBody = (modelId, trainingData, labels, fields) => ({
  model_id: modelId, training_data: trainingData, ...(labels === undefined ? {} : { labels }), ...fields,
});

export class MSmartComputeClient {
  // timeoutMs: per HTTP call (default 60 s); signal: an AbortSignal that cancels every call.
  constructor(baseUrl = 'http://127.0.0.1:8080/api/v1', apiKey = undefined,
    { maxRetries = 3, timeoutMs = 60000, signal = undefined } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
    if (apiKey) this.headers.Authorization = `Bearer ${apiKey}`;
    this.maxRetries = maxRetries;
    this.timeoutMs = timeoutMs;
    this.signal = signal;
  }

  // The same client with other call options: client.withOptions({ signal }).inference(...).
  withOptions({ timeoutMs = this.timeoutMs, signal = this.signal } = {}) {
    const copy = Object.create(Object.getPrototypeOf(this));
    return Object.assign(copy, this, { timeoutMs, signal });
  }

  async fetchOnce(url, init) {
    const timeout = AbortSignal.timeout(this.timeoutMs);
    const signal = this.signal ? AbortSignal.any([this.signal, timeout]) : timeout;
    try {
      return await fetch(url, { ...init, signal });
    } catch (err) {
      if (this.signal?.aborted) throw new MSmartComputeError('ABORTED', `${init.method} ${url} was aborted`);
      if (timeout.aborted) throw new MSmartComputeError('REQUEST_TIMEOUT', `no answer from ${url} within ${this.timeoutMs} ms`);
      throw new MSmartComputeError('CONNECTION_FAILED', `cannot reach ${this.baseUrl}: ${err.cause?.code || err.message}`);
    }
  }

  async request(method, path, body = undefined, params = undefined) {
    let url = this.baseUrl + path;
    if (params) {
      const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null));
      if ([...query].length) url += `?${query}`;
    }
    for (let attempt = 0; ; attempt += 1) {
      const response = await this.fetchOnce(url, {
        method,
        headers: this.headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (response.status === 429 && attempt < this.maxRetries && response.headers.get('Retry-After')) {
        await sleep(Number(response.headers.get('Retry-After')) * 1000);
        continue;
      }
      let payload;
      try {
        payload = await response.json();
      } catch {
        throw new MSmartComputeError(`HTTP_${response.status}`, response.statusText, {}, response.status);
      }
      if (!response.ok || payload.success === false) {
        const err = payload.error || {};
        throw new MSmartComputeError(err.code || `HTTP_${response.status}`, err.message || response.statusText,
          err.details || {}, response.status);
      }
      return withoutEnvelope(payload);
    }
  }

  health() { return this.request('GET', '/health'); }

  loadModel(modelConfig) { return this.request('POST', '/models', modelConfig); }
  async listModels() { return (await this.request('GET', '/models')).models; }
  getModel(modelId) { return this.request('GET', `/models/${enc(modelId)}`); }
  unloadModel(modelId) { return this.request('DELETE', `/models/${enc(modelId)}`); }

  inference(modelId, inputData, options = {}, fields = {}) {
    return this.request('POST', '/inference', { model_id: modelId, input_data: inputData, options, ...fields });
  }
  inferenceAsync(modelId, inputData, options = {}, fields = {}) {
    return this.request('POST', '/inference/async', { model_id: modelId, input_data: inputData, options, ...fields });
  }
  getInference(requestId) { return this.request('GET', `/inference/${enc(requestId)}`); }
  batchInference(requests) { return this.request('POST', '/inference/batch', { requests }); }

  // kind: 'inference' or 'training'; onProgress(result) after each poll.
  async wait(requestId, { timeoutMs = 300000, pollMs = 50, kind = 'inference', onProgress } = {}) {
    const getter = { inference: (id) => this.getInference(id), training: (id) => this.getTraining(id) }[kind];
    if (!getter) throw new MSmartComputeError('INVALID_INPUT_DATA', `unknown job kind ${kind}`);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const result = await getter(requestId);
      if (onProgress) onProgress(result);
      if (result.status === 'completed') return result;
      if (result.status === 'failed' || result.status === 'cancelled') {
        throw new MSmartComputeError('JOB_FAILED', `${requestId} ${result.status}: ${result.error?.message}`, { error: result.error });
      }
      if (Date.now() > deadline) throw new MSmartComputeError('REQUEST_TIMEOUT', `${requestId} still ${result.status}`);
      if (this.signal?.aborted) throw new MSmartComputeError('ABORTED', `waiting for ${requestId} was aborted`);
      await sleep(pollMs);
      pollMs = Math.min(pollMs * 1.5, 1000);
    }
  }

  // fields: epochs, learning_rate, optimizer, loss_function, hyperparameters, seed, save_path.
  train(modelId, trainingData, labels = undefined, fields = {}) {
    return this.request('POST', '/training', trainingBody(modelId, trainingData, labels, fields));
  }
  trainAsync(modelId, trainingData, labels = undefined, fields = {}) {
    return this.request('POST', '/training/async', trainingBody(modelId, trainingData, labels, fields));
  }
  getTraining(requestId) { return this.request('GET', `/training/${enc(requestId)}`); }
  cancelTraining(requestId) { return this.request('DELETE', `/training/${enc(requestId)}`); }

  // body: { optimization_type, target_precision, calibration_data, options }
  optimizeModel(modelId, body) { return this.request('POST', `/models/${enc(modelId)}/optimize`, body); }

  createSession(userId, modelId) { return this.request('POST', '/sessions', { user_id: userId, model_id: modelId }); }
  getSession(sessionId) { return this.request('GET', `/sessions/${enc(sessionId)}`); }
  endSession(sessionId) { return this.request('DELETE', `/sessions/${enc(sessionId)}`); }

  async listJobs(limit = 50) { return (await this.request('GET', '/jobs', undefined, { limit })).jobs; }

  async metrics() { return (await this.request('GET', '/metrics')).metrics; }
  async metricsHistory({ startTime, endTime, interval = 60 } = {}) {
    return (await this.request('GET', '/metrics/history', undefined,
      { start_time: startTime, end_time: endTime, interval })).history;
  }

  allocateResources(userId, memorySize, computeUnits, duration) {
    return this.request('POST', '/resources',
      { user_id: userId, memory_size: memorySize, compute_units: computeUnits, duration });
  }
  async listAllocations() { return (await this.request('GET', '/resources')).allocations; }
  getAllocation(allocationId) { return this.request('GET', `/resources/${enc(allocationId)}`); }
  deallocateResources(allocationId) { return this.request('DELETE', `/resources/${enc(allocationId)}`); }

  createVirtualGpu(virtualGpuId, memorySize, computeUnits, schedulingPolicy = 'round_robin', fields = {}) {
    return this.request('POST', '/virtualization/gpus', {
      virtual_gpu_id: virtualGpuId, memory_size: memorySize, compute_units: computeUnits,
      scheduling_policy: schedulingPolicy, ...fields,
    });
  }
  async listVirtualGpus() { return (await this.request('GET', '/virtualization/gpus')).virtual_gpus; }
  getVirtualGpu(virtualGpuId) { return this.request('GET', `/virtualization/gpus/${enc(virtualGpuId)}`); }
  destroyVirtualGpu(virtualGpuId) { return this.request('DELETE', `/virtualization/gpus/${enc(virtualGpuId)}`); }
}
