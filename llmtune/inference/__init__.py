"""Using a trained model: loading a run (adapter on its base, the run's precision and chat template), refusing a run
of the wrong kind, classifier and image-classifier predictions and metrics, generation, perplexity, and merging an
adapter into its base. Tasks (after training), ship (serve, export) and the API all use these."""
