"""Ray and S3 glue around ``sarl.model``: storage, training, tuning, serving, bulk prediction."""
