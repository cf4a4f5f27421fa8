"""The engine: moving averages of named tensors (registered by name, also from other packages), the update
kernel, the decay rules as data, DTensor layouts and the post-hoc profiles' float64 math.

The online face, the callbacks and the offline command all average through these modules."""
