// Types for msmartcompute.mjs. Every method resolves to the answer's fields without the
// envelope (success, error, timestamp) and rejects with MSmartComputeError.

export type Rows = number[][];
export type JobKind = 'inference' | 'training';
export type ModelType = 'transformer' | 'encoder' | 'mlp' | 'torchscript' | 'exported' | (string & {});

export class MSmartComputeError extends Error {
  constructor(code: string, message: string, details?: Record<string, unknown>, status?: number);
  /** The API's error code, or CONNECTION_FAILED / REQUEST_TIMEOUT / ABORTED / JOB_FAILED / HTTP_<status>. */
  code: string;
  details: Record<string, unknown>;
  /** The HTTP status; undefined when no answer came. */
  status?: number;
}

export interface ClientOptions {
  /** Retries after a 429 that carries Retry-After (default 3). */
  maxRetries?: number;
  /** Per HTTP call (default 60000). */
  timeoutMs?: number;
  /** Cancels every call of this client (and wait()). */
  signal?: AbortSignal;
}

export interface ModelConfig {
  model_id: string;
  model_type: ModelType;
  model_path?: string;
  max_batch_size?: number;
  max_sequence_length?: number;
  enable_quantization?: boolean;
  enable_tensor_cores?: boolean;
  enable_mixed_precision?: boolean;
  virtual_gpu_id?: string;
  parameters?: Record<string, unknown>;
  [field: string]: unknown;
}

export interface ModelInfo {
  model_id: string;
  model_type: string;
  status: string;
  memory_usage: number;
  load_time: string | null;
  virtual_gpu_id: string | null;
  device: string | null;
  [field: string]: unknown;
}

export interface InferenceOptions { temperature?: number; top_p?: number; max_tokens?: number; timeout?: number; [option: string]: unknown }
export interface InferenceFields { batch_size?: number; sequence_length?: number; data_type?: string; session_id?: string }
export interface InferenceResult { request_id: string; output_data: Rows; inference_time: number; tokens_generated: number; memory_used: number }
export interface Queued { request_id: string; status: string; estimated_completion: string }
export interface JobError { code: string; message: string; details?: Record<string, unknown> }
export interface AsyncInferenceResult { request_id: string; status: string; output_data: Rows | null; inference_time: number | null; completion_time: string | null; error?: JobError | null }
export interface BatchResult { results: Array<{ request_id: string; output_data?: Rows; inference_time?: number; error?: JobError }>; total_time: number }

export interface TrainingFields { epochs?: number; learning_rate?: number; optimizer?: string; loss_function?: string; hyperparameters?: Record<string, unknown>; seed?: number; save_path?: string }
export interface TrainingResult {
  request_id: string; status?: string; final_loss: number | null; loss_history: number[]; training_time: number | null;
  completion_time?: string | null; epochs?: number; epochs_completed: number; current_loss?: number | null;
  model_updated: boolean | null; error?: JobError | null;
}
export interface OptimizeBody { optimization_type: string; target_precision?: string; calibration_data?: Rows; options?: Record<string, unknown> }
export interface Job {
  request_id: string; kind: JobKind; status: string; model_id: string | null; owner: string | null;
  created_at: string; started_at: string | null; completed_at: string | null; error: string | null;
  epochs?: number | null; epochs_completed?: number; current_loss?: number | null; loss_history?: number[];
}
export interface Session { session_id: string; user_id: string; model_id: string; created_at: string; expires_at: string }
export interface Allocation { allocation_id: string; user_id: string; gpu_id: number; memory_size: number; compute_units: number; start_time: string; end_time: string }
export interface VirtualGpu { virtual_gpu_id: string; physical_gpu_id: number; memory_size: number; compute_units: number; status: string; created_at: string; scheduling_policy: string }
export interface Metrics { throughput: number; latency: number | null; total_requests: number; [field: string]: unknown }
export interface HistoryPoint { timestamp: string; samples: number; [field: string]: number | string | null }
export interface Health { status: string; version: string; uptime: number; gpu_status: string; memory_usage: number }
export interface Message { message: string; [field: string]: unknown }

export class MSmartComputeClient {
  constructor(baseUrl?: string, apiKey?: string, options?: ClientOptions);
  baseUrl: string;
  timeoutMs: number;
  signal?: AbortSignal;
  /** The same client with other call options, e.g. client.withOptions({ signal }).inference(...). */
  withOptions(options: { timeoutMs?: number; signal?: AbortSignal }): MSmartComputeClient;
  request(method: string, path: string, body?: unknown, params?: Record<string, unknown>): Promise<Record<string, any>>;

  health(): Promise<Health>;
  loadModel(modelConfig: ModelConfig): Promise<{ model_id: string; message: string; memory_allocated: number; load_time: number }>;
  listModels(): Promise<ModelInfo[]>;
  getModel(modelId: string): Promise<ModelInfo>;
  unloadModel(modelId: string): Promise<Message>;

  inference(modelId: string, inputData: Rows, options?: InferenceOptions, fields?: InferenceFields): Promise<InferenceResult>;
  inferenceAsync(modelId: string, inputData: Rows, options?: InferenceOptions, fields?: InferenceFields): Promise<Queued>;
  getInference(requestId: string): Promise<AsyncInferenceResult>;
  batchInference(requests: Array<{ model_id: string; input_data: Rows; options?: InferenceOptions } & InferenceFields>): Promise<BatchResult>;
  wait(requestId: string, options?: { timeoutMs?: number; pollMs?: number; kind?: 'inference'; onProgress?: (r: AsyncInferenceResult) => void }): Promise<AsyncInferenceResult>;
  wait(requestId: string, options: { timeoutMs?: number; pollMs?: number; kind: 'training'; onProgress?: (r: TrainingResult) => void }): Promise<TrainingResult>;

  train(modelId: string, trainingData: Rows, labels?: number[] | Rows, fields?: TrainingFields): Promise<TrainingResult>;
  trainAsync(modelId: string, trainingData: Rows, labels?: number[] | Rows, fields?: TrainingFields): Promise<Queued>;
  getTraining(requestId: string): Promise<TrainingResult>;
  optimizeModel(modelId: string, body: OptimizeBody): Promise<Record<string, any>>;
  listJobs(limit?: number): Promise<Job[]>;

  createSession(userId: string, modelId: string): Promise<Session>;
  getSession(sessionId: string): Promise<Session>;
  endSession(sessionId: string): Promise<Message>;

  metrics(): Promise<Metrics>;
  metricsHistory(options?: { startTime?: string; endTime?: string; interval?: number }): Promise<HistoryPoint[]>;

  allocateResources(userId: string, memorySize: number, computeUnits: number, duration: number): Promise<Allocation>;
  listAllocations(): Promise<Allocation[]>;
  getAllocation(allocationId: string): Promise<Allocation>;
  deallocateResources(allocationId: string): Promise<Message>;

  createVirtualGpu(virtualGpuId: string, memorySize: number, computeUnits: number, schedulingPolicy?: string, fields?: Record<string, unknown>): Promise<VirtualGpu>;
  listVirtualGpus(): Promise<VirtualGpu[]>;
  getVirtualGpu(virtualGpuId: string): Promise<VirtualGpu>;
  destroyVirtualGpu(virtualGpuId: string): Promise<Message>;
}
