"""Files `sbtrain export` copies into an exported folder, beside sbtrain's model and attention
sources: the transformers configuration and model classes. They import transformers, so sbtrain
imports them only where transformers is needed (`eval-ppl hf:` loads exported folders with them,
running no code of the folder); the export makes their sbtrain imports relative."""
