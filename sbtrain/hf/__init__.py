"""Files `sbtrain export` copies into an exported folder, beside sbtrain's model and attention
sources: the transformers configuration and model classes. They import transformers and the
copied sources (relatively), never sbtrain, so sbtrain never imports them either."""
