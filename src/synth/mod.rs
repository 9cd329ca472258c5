//! Hierarchical synthetic data: scene templates, then detail injection.
