"""Run in a fresh process by test_hub.py: load an exported folder with the stock Auto classes and pipeline while
this project is NOT importable, generate, and print the results as JSON."""

import json
import sys

sys.modules["dynamic_llava"] = None  # any import of the project now fails
sys.path[:] = [p for p in sys.path if p not in ("", ".") and not p.rstrip("/").endswith(sys.argv[3])]

import threading  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer, pipeline  # noqa: E402

folder, image_paths = sys.argv[1], sys.argv[2].split(",")
images = [Image.open(p) for p in image_paths]
result = {"transformers": transformers.__version__}

config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
result["classes"] = [type(config).__module__, type(processor).__module__, type(model).__module__]
if int(transformers.__version__.split(".")[0]) < 5:
    from transformers import AutoModelForVision2Seq

    result["vision2seq_class"] = type(AutoModelForVision2Seq.from_pretrained(folder, trust_remote_code=True)).__name__

inputs = processor(images=images[0], text="<image>\nw5 w6 w7", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
cache = out["cache"] if "cache" in out else out["past_key_values"]
result["generate_ids"] = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
result["cache_class"] = type(cache).__name__
result["kept_vision"] = cache.kept_vision_indices[0].tolist()

messages = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "w5 w6 w7"}]}]
            for im in images]  # fmt: skip
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
result["pipeline_one"] = pipe(text=messages[0], max_new_tokens=8, return_full_text=False)[0]["generated_text"]
batch = pipe(text=messages, max_new_tokens=8, return_full_text=False, batch_size=2)
result["pipeline_batch"] = [item[0]["generated_text"] for item in batch]

chat = processor.apply_chat_template(messages[0], add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="pt")  # fmt: skip
streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
thread = threading.Thread(target=model.generate, kwargs=dict(chat, max_new_tokens=8, do_sample=False, streamer=streamer))
thread.start()
result["streamed"] = "".join(streamer)
thread.join()
print("RESULT " + json.dumps(result))
