// Public surface of the model generator (src/model).

export { generateModel, runGenerateModel, modelFileNames, type GenerateOptions } from './generate.js';
export { PRESETS, PRESET_NAMES, getPreset, type Preset, type PresetName, type TextConfig, type VisionConfig } from './presets.js';
export { MODEL_DTYPES, planModel, planTextTensors, planVisionTensors, textMetadata, visionMetadata, textVocab, type ModelDType, type PlannedTensor } from './qwen25vl.js';
export { buildVocab, encode, decode, QWEN_ADDED_TOKENS, TokenType, type Vocab } from './tokenizer.js';
export { QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_DEFAULT_SYSTEM_PROMPT } from './chat-template.js';
export { readGGUF, readTensorBytes, readTensorF32, type GGUFFile, type GGUFReadTensor } from './gguf-reader.js';
export { GGUFWriter, buildHeader } from './gguf-writer.js';
export { GGUFMetadata, GGUFValueType, GGMLType, LlamaFileType, tensorByteSize } from './gguf.js';
