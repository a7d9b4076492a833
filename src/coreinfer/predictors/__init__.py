"""Selectors that take core neurons from more than the prompt itself (clusters of similar prompts)."""

from .similarity import ClusterMismatch, ClusterSet, SimilaritySelector, build_clusters, load_clusters

__all__ = ["ClusterMismatch", "ClusterSet", "SimilaritySelector", "build_clusters", "load_clusters"]
