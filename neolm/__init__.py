"""neolm: GPT-Neo and GPT-NeoX in plain PyTorch.

    import neolm
    lm = neolm.load("EleutherAI/pythia-160m", revision="step143000", dtype="bfloat16")
    lm.generate("EleutherAI has", do_sample=True, min_length=50)
    generator = neolm.pipeline("text-generation", model="EleutherAI/gpt-neo-1.3B")
    generator("EleutherAI has", do_sample=True, min_length=50)
    chat = neolm.Conversation(lm, [{"role": "system", "content": "A helpful assistant."}], max_new_tokens=64)
    print("".join(chat.send("Who wrote Hamlet?")))  # each turn computes only its new tokens
"""

from neolm.api import LanguageModel, load, pipeline
from neolm.config import Config
from neolm.conversation import Conversation
from neolm.errors import NeolmError
from neolm.generation_config import GenerationConfig
from neolm.model import GPT
from neolm.synthid import SynthIDConfig
from neolm.watermark import WatermarkingConfig

__all__ = ["Config", "Conversation", "GPT", "GenerationConfig", "LanguageModel", "NeolmError", "SynthIDConfig",
           "WatermarkingConfig", "load", "pipeline"]
__version__ = "0.1.0"
