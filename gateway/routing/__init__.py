"""Routing: complexity tier, provider selection, quality windows, weights and the cascade."""
