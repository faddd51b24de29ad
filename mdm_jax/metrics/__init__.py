"""Evaluation metrics: text statistics, generative perplexity, Frechet distances, classifiers."""
