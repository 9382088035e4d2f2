// A conversation as the model's chat template takes it: every image part becomes the engine's
// media marker in place (the engine tokenizes the result once, with the images' tokens).
import type { ChatTemplateMessage } from '../engine/native-types.js';
import { badRequest } from './errors.js';
import type { ValidatedMessage } from './validate.js';

/**
 * Messages as the chat template takes them: each image part becomes the media marker at its
 * place, parts are concatenated without separator (what Qwen2.5-VL's HF template renders for
 * list content, and so what vLLM prompts with).
 */
export function toTemplateMessages(
  messages: ValidatedMessage[],
  mediaMarker: string,
): { templateMessages: ChatTemplateMessage[]; images: { url: string; param: string }[] } {
  const images: { url: string; param: string }[] = [];
  const templateMessages = messages.map((m, i) => {
    let content = '';
    for (const part of m.parts) {
      if (part.type === 'text') {
        if (mediaMarker && part.text.includes(mediaMarker)) {
          throw badRequest(`message text may not contain the reserved marker ${mediaMarker}`, `messages[${i}].content`);
        }
        content += part.text;
      } else {
        images.push({ url: part.url, param: part.param });
        content += mediaMarker;
      }
    }
    return { role: m.role, content };
  });
  return { templateMessages, images };
}
