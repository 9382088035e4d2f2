// The OpenAI protocol as this server speaks it (chat and text completions, models, vLLM's
// tokenize / detokenize: the subset vLLM serves for a captioner), in one place. Request types
// describe what clients may send (loosely typed where validation has to look at raw JSON);
// response types are exactly what we emit.

// ---------- requests ----------

export interface TextContentPart {
  type: 'text';
  text: string;
}

export interface ImageUrlContentPart {
  type: 'image_url';
  image_url: { url: string; detail?: 'auto' | 'low' | 'high' } | string;
}

export type ContentPart = TextContentPart | ImageUrlContentPart;

export type ChatRole = 'system' | 'developer' | 'user' | 'assistant';

export interface ChatMessageParam {
  role: ChatRole;
  content: string | ContentPart[] | null;
  name?: string;
}

export interface StreamOptions {
  include_usage?: boolean | null;
}

/** POST /v1/chat/completions body. vLLM's sampling extensions included (top_k, min_p, ...). */
export interface ChatCompletionRequest {
  model?: string;
  messages: ChatMessageParam[];
  max_tokens?: number | null;
  max_completion_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  top_k?: number | null;
  min_p?: number | null;
  repetition_penalty?: number | null;
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  seed?: number | null;
  stop?: string | string[] | null;
  stop_token_ids?: number[] | null;
  ignore_eos?: boolean | null;
  min_tokens?: number | null;
  n?: number | null;
  logprobs?: boolean | null;
  top_logprobs?: number | null;
  stream?: boolean | null;
  stream_options?: StreamOptions | null;
  user?: string;
}

// ---------- responses ----------

export interface TopLogprob {
  token: string;
  logprob: number;
  bytes: number[] | null;
}

export interface ChatCompletionTokenLogprob extends TopLogprob {
  top_logprobs: TopLogprob[];
}

export interface ChoiceLogprobs {
  content: ChatCompletionTokenLogprob[] | null;
}

export type ResponseFinishReason = 'stop' | 'length';

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export interface ChatCompletionMessage {
  role: 'assistant';
  content: string;
}

export interface ChatCompletionChoice {
  index: number;
  message: ChatCompletionMessage;
  logprobs: ChoiceLogprobs | null;
  finish_reason: ResponseFinishReason;
  /** vLLM extension: the stop string or token id that ended generation; null for EOS / length. */
  stop_reason: string | number | null;
}

export interface ChatCompletionResponse {
  id: string;
  object: 'chat.completion';
  created: number;
  model: string;
  choices: ChatCompletionChoice[];
  usage: Usage;
}

export interface ChatCompletionChunkDelta {
  role?: 'assistant';
  content?: string;
}

export interface ChatCompletionChunkChoice {
  index: number;
  delta: ChatCompletionChunkDelta;
  logprobs: ChoiceLogprobs | null;
  finish_reason: ResponseFinishReason | null;
  stop_reason?: string | number | null;
}

export interface ChatCompletionChunk {
  id: string;
  object: 'chat.completion.chunk';
  created: number;
  model: string;
  choices: ChatCompletionChunkChoice[];
  /** Present (null until the last chunk) only when stream_options.include_usage is true. */
  usage?: Usage | null;
}

// ---------- text completions (/v1/completions) ----------

/** Legacy completions logprobs: parallel arrays, top alternatives as {token: logprob}. */
export interface CompletionLogprobs {
  text_offset: number[];
  token_logprobs: (number | null)[];
  tokens: string[];
  top_logprobs: (Record<string, number> | null)[];
}

export interface CompletionChoice {
  index: number;
  text: string;
  logprobs: CompletionLogprobs | null;
  finish_reason: ResponseFinishReason | null;
  /** vLLM extension, as in chat. */
  stop_reason: string | number | null;
}

export interface CompletionResponse {
  id: string;
  object: 'text_completion';
  created: number;
  model: string;
  choices: CompletionChoice[];
  usage: Usage;
}

export interface CompletionChunk {
  id: string;
  object: 'text_completion';
  created: number;
  model: string;
  choices: CompletionChoice[];
  usage?: Usage | null;
}

// ---------- vLLM's /tokenize and /detokenize ----------

export interface TokenizeResponse {
  count: number;
  max_model_len: number;
  tokens: number[];
  /** The text of each token, when return_token_strs is true; else null. */
  token_strs: string[] | null;
}

export interface DetokenizeResponse {
  prompt: string;
}

export interface ModelCard {
  id: string;
  object: 'model';
  created: number;
  owned_by: string;
  /** vLLM extension: the model path the server loaded. */
  root: string;
  parent: string | null;
  /** vLLM extension: the context length in tokens. */
  max_model_len: number;
}

export interface ModelList {
  object: 'list';
  data: ModelCard[];
}

export interface ErrorObject {
  message: string;
  type: string;
  param: string | null;
  code: string | null;
}

export interface ErrorResponse {
  error: ErrorObject;
}
