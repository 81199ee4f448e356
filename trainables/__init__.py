"""Everything that runs inside one trial: data, models, the training loop, metrics, prediction."""
