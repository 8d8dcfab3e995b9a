"""Demo assets, not the library: the tiny offline model and its task (``toy``), SmolLM2-135M-Instruct built offline
from a PyPI package (``smollm2``) and its chat task (``chat_tasks``), and the one way they write a model folder
(``model_folder``). Quickstarts, tests and benchmarks use them; nothing here downloads anything."""
