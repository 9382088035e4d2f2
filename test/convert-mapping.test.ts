// The converter maps CapRL-3B's full checkpoint: the Hugging Face tensor names and shapes of
// Qwen2.5-VL-3B (written out here from the model's published layout, independently of the
// converter's tables) become exactly the GGUF tensors planModel('caprl-3b') plans, and its
// config.json becomes exactly the caprl-3b preset.
import t from 'tap';
import { checkArchitecture, hfConfigFromShape, hfPreprocessorFromShape, shapeFromHfConfig } from '../src/convert/hf-config.js';
import { canonicalHfName, hfTensorsFromPlan, mapHfTensor } from '../src/convert/qwen25vl-hf.js';
import { PRESETS } from '../src/model/presets.js';
import { planModel } from '../src/model/qwen25vl.js';

/** model.safetensors.index.json's tensors of Qwen2.5-VL-3B-Instruct / CapRL-3B, with their shapes. */
function caprl3bCheckpoint(): Array<[string, number[]]> {
  const out: Array<[string, number[]]> = [['model.embed_tokens.weight', [151936, 2048]], ['model.norm.weight', [2048]]];
  for (let i = 0; i < 36; i++) {
    const l = `model.layers.${i}`;
    out.push(
      [`${l}.input_layernorm.weight`, [2048]], [`${l}.post_attention_layernorm.weight`, [2048]],
      [`${l}.self_attn.q_proj.weight`, [2048, 2048]], [`${l}.self_attn.q_proj.bias`, [2048]],
      [`${l}.self_attn.k_proj.weight`, [256, 2048]], [`${l}.self_attn.k_proj.bias`, [256]],
      [`${l}.self_attn.v_proj.weight`, [256, 2048]], [`${l}.self_attn.v_proj.bias`, [256]],
      [`${l}.self_attn.o_proj.weight`, [2048, 2048]],
      [`${l}.mlp.gate_proj.weight`, [11008, 2048]], [`${l}.mlp.up_proj.weight`, [11008, 2048]], [`${l}.mlp.down_proj.weight`, [2048, 11008]],
    );
  }
  out.push(['visual.patch_embed.proj.weight', [1280, 3, 2, 14, 14]]);
  for (let i = 0; i < 32; i++) {
    const b = `visual.blocks.${i}`;
    out.push(
      [`${b}.norm1.weight`, [1280]], [`${b}.norm2.weight`, [1280]],
      [`${b}.attn.qkv.weight`, [3840, 1280]], [`${b}.attn.qkv.bias`, [3840]],
      [`${b}.attn.proj.weight`, [1280, 1280]], [`${b}.attn.proj.bias`, [1280]],
      [`${b}.mlp.gate_proj.weight`, [3420, 1280]], [`${b}.mlp.gate_proj.bias`, [3420]],
      [`${b}.mlp.up_proj.weight`, [3420, 1280]], [`${b}.mlp.up_proj.bias`, [3420]],
      [`${b}.mlp.down_proj.weight`, [1280, 3420]], [`${b}.mlp.down_proj.bias`, [1280]],
    );
  }
  out.push(
    ['visual.merger.ln_q.weight', [1280]],
    ['visual.merger.mlp.0.weight', [5120, 5120]], ['visual.merger.mlp.0.bias', [5120]],
    ['visual.merger.mlp.2.weight', [2048, 5120]], ['visual.merger.mlp.2.bias', [2048]],
  );
  return out;
}

/** config.json of Qwen2.5-VL-3B-Instruct (CapRL-3B keeps it), as published. */
const CAPRL_3B_CONFIG = {
  architectures: ['Qwen2_5_VLForConditionalGeneration'],
  attention_dropout: 0.0, bos_token_id: 151643, eos_token_id: 151645,
  vision_start_token_id: 151652, vision_end_token_id: 151653, vision_token_id: 151654, image_token_id: 151655, video_token_id: 151656,
  hidden_act: 'silu', hidden_size: 2048, initializer_range: 0.02, intermediate_size: 11008, max_position_embeddings: 128000,
  max_window_layers: 70, model_type: 'qwen2_5_vl', num_attention_heads: 16, num_hidden_layers: 36, num_key_value_heads: 2,
  rms_norm_eps: 1e-06, rope_theta: 1000000.0, sliding_window: 32768, tie_word_embeddings: true, torch_dtype: 'bfloat16',
  transformers_version: '4.41.2', use_cache: true, use_sliding_window: false,
  vision_config: {
    depth: 32, hidden_act: 'silu', hidden_size: 1280, intermediate_size: 3420, num_heads: 16, in_chans: 3, out_hidden_size: 2048,
    patch_size: 14, spatial_merge_size: 2, spatial_patch_size: 14, window_size: 112, fullatt_block_indexes: [7, 15, 23, 31],
    tokens_per_second: 2, temporal_patch_size: 2,
  },
  rope_scaling: { type: 'mrope', mrope_section: [16, 24, 24] },
  vocab_size: 151936,
};
const CAPRL_3B_PREPROCESSOR = {
  min_pixels: 3136, max_pixels: 12845056, patch_size: 14, temporal_patch_size: 2, merge_size: 2,
  image_mean: [0.48145466, 0.4578275, 0.40821073], image_std: [0.26862954, 0.26130258, 0.27577711],
  image_processor_type: 'Qwen2VLImageProcessor', processor_class: 'Qwen2_5_VLProcessor',
};

t.test('CapRL-3B checkpoint tensors map onto planModel(caprl-3b), one to one', async (t) => {
  const plan = planModel(PRESETS['caprl-3b'], 'bf16');
  const want = new Map([...plan.text.tensors, ...plan.vision.tensors].map((x) => [x.name, x.shape.join('x')]));
  const got = new Map<string, string>();
  for (const [name, shape] of caprl3bCheckpoint()) {
    const parts = mapHfTensor(name, shape);
    if (!parts) {
      t.fail(`${name} not mapped`);
      continue;
    }
    for (const p of parts) {
      if (got.has(p.gguf)) t.fail(`${p.gguf} produced twice`);
      got.set(p.gguf, p.shape.join('x'));
    }
  }
  t.equal(got.size, 434 + 519, '434 text + 519 vision GGUF tensors');
  t.same([...got.keys()].filter((k) => !want.has(k)), [], 'nothing mapped outside the plan');
  t.same([...want.keys()].filter((k) => !got.has(k)), [], 'every planned tensor mapped');
  t.same([...want].filter(([k, s]) => got.get(k) !== s), [], 'every shape equal');
  t.same(mapHfTensor('visual.blocks.3.attn.qkv.weight', [3840, 1280])!.map((p) => [p.gguf, p.extract.first]),
    [['v.blk.3.attn_q.weight', 0], ['v.blk.3.attn_k.weight', 1280 * 1280], ['v.blk.3.attn_v.weight', 2 * 1280 * 1280]], 'qkv split q, k, v by rows');
  t.same(mapHfTensor('visual.patch_embed.proj.weight', [1280, 3, 2, 14, 14])!.map((p) => [p.gguf, p.shape, p.extract]),
    [['v.patch_embd.weight', [14, 14, 3, 1280], { first: 0, blocks: 3840, stride: 392, len: 196 }],
      ['v.patch_embd.weight.1', [14, 14, 3, 1280], { first: 196, blocks: 3840, stride: 392, len: 196 }]], 'Conv3D split along time');
  const byName = (a: [string, number[]], b: [string, number[]]) => a[0].localeCompare(b[0]);
  t.same(hfTensorsFromPlan([...plan.text.tensors, ...plan.vision.tensors]).map((e): [string, number[]] => [e.name, e.shape]).sort(byName),
    caprl3bCheckpoint().sort(byName), 'and back: the plan as a checkpoint is the CapRL-3B checkpoint');
});

t.test('newer transformers names and untied output', async (t) => {
  t.equal(canonicalHfName('model.language_model.layers.3.mlp.up_proj.weight'), 'model.layers.3.mlp.up_proj.weight');
  t.equal(canonicalHfName('model.visual.blocks.0.norm1.weight'), 'visual.blocks.0.norm1.weight');
  t.same(mapHfTensor('model.language_model.embed_tokens.weight', [151936, 2048])!.map((p) => p.gguf), ['token_embd.weight']);
  t.same(mapHfTensor('lm_head.weight', [151936, 2048])!.map((p) => [p.gguf, p.shape]), [['output.weight', [2048, 151936]]]);
  t.equal(mapHfTensor('model.layers.0.self_attn.rotary_emb.inv_freq', [64]), null);
  t.equal(mapHfTensor('vision_tower.blocks.0.norm1.weight', [1280]), null);
  t.throws(() => mapHfTensor('visual.patch_embed.proj.weight', [1280, 3, 3, 14, 14]), /temporal_patch_size 2 only/);
});

t.test('config.json -> the caprl-3b preset; preset -> config.json -> preset', async (t) => {
  const p = PRESETS['caprl-3b'];
  const s = shapeFromHfConfig(CAPRL_3B_CONFIG, CAPRL_3B_PREPROCESSOR, 151643);
  t.same(s, { text: p.text, vision: p.vision }, 'CapRL-3B config.json is the caprl-3b preset');
  const { hidden_size, intermediate_size, num_attention_heads, num_hidden_layers, num_key_value_heads, vocab_size, rope_theta, rope_scaling, max_position_embeddings, rms_norm_eps, tie_word_embeddings, ...rest } = CAPRL_3B_CONFIG;
  const nested = { ...rest, text_config: { hidden_size, intermediate_size, num_attention_heads, num_hidden_layers, num_key_value_heads, vocab_size, rope_theta, rope_scaling, max_position_embeddings, rms_norm_eps, tie_word_embeddings } };
  t.same(shapeFromHfConfig(nested, CAPRL_3B_PREPROCESSOR, 151643).text, p.text, 'text_config (transformers >= 4.53) reads the same');
  for (const preset of [PRESETS.tiny, p]) {
    const ids = { bosId: 1, eosId: 2, vision: { start: 3, end: 4, pad: 5, image: 6, video: 7 } };
    const back = shapeFromHfConfig(hfConfigFromShape(preset, ids, 'bfloat16'), hfPreprocessorFromShape(preset), preset.text.nBpe);
    t.same(back, { text: preset.text, vision: preset.vision }, `${preset.name}: round trip`);
  }
  t.doesNotThrow(() => checkArchitecture(CAPRL_3B_CONFIG));
  t.throws(() => shapeFromHfConfig({ ...CAPRL_3B_CONFIG, rope_scaling: { type: 'mrope', mrope_section: [16, 24, 20] } }, CAPRL_3B_PREPROCESSOR, 151643), /mrope sections sum 60 != head_dim\/2 = 64/);
});
