"""The SPPO pipeline: prompts, generation, ranking, the training set, training, iteration."""
