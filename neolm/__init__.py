"""neolm: GPT-Neo and GPT-NeoX in plain PyTorch.

    import neolm
    lm = neolm.load("EleutherAI/pythia-160m", revision="step143000", dtype="bfloat16")
    lm.generate("EleutherAI has", do_sample=True, min_length=50)
    generator = neolm.pipeline("text-generation", model="EleutherAI/gpt-neo-1.3B")
    generator("EleutherAI has", do_sample=True, min_length=50)
"""

from neolm.api import LanguageModel, load, pipeline
from neolm.config import Config
from neolm.errors import NeolmError
from neolm.generate import GenerationConfig
from neolm.model import GPT

__all__ = ["Config", "GPT", "GenerationConfig", "LanguageModel", "NeolmError", "load", "pipeline"]
__version__ = "0.1.0"
