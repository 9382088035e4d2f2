// The chat template of Qwen2-VL-Instruct / Qwen2.5-VL-Instruct (chat_template.json in the HF
// repos; CapRL-3B inherits it), stored as tokenizer.chat_template.
//
// Rendering, for one user message with an image and a text item and add_generation_prompt:
//   <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
//   <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n
//   <|im_start|>assistant\n
// (newlines shown as \n). A string content is inserted verbatim.
//
// Note for llama.cpp users: libmtmd adds <|vision_start|> and <|vision_end|> itself around the
// image embeddings it substitutes for its media marker ("<__media__>" by default), so a prompt
// for mtmd must carry the marker *instead of* the whole
// "<|vision_start|><|image_pad|><|vision_end|>" triple.

export const QWEN2_VL_CHAT_TEMPLATE =
  "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}" +
  "{% for message in messages %}" +
  "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" +
  "<|im_start|>{{ message['role'] }}\n" +
  "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n" +
  "{% else %}{% for content in message['content'] %}" +
  "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}" +
  "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}" +
  "<|vision_start|><|image_pad|><|vision_end|>" +
  "{% elif content['type'] == 'video' or 'video' in content %}" +
  "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}" +
  "<|vision_start|><|video_pad|><|vision_end|>" +
  "{% elif 'text' in content %}{{ content['text'] }}{% endif %}" +
  "{% endfor %}<|im_end|>\n" +
  "{% endif %}{% endfor %}" +
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/** The default system prompt the template inserts when the first message is not a system one. */
export const QWEN2_VL_DEFAULT_SYSTEM_PROMPT = 'You are a helpful assistant.';
