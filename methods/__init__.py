"""The zoo's methods, one module each. Every module here is imported by `zoo.training.registry.discover`,
and each registers its Method subclass with `@register`; nothing else names them."""
