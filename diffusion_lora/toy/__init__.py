"""The toy world of the embedded base model: procedural shape scenes, their styles, and analysis.

``scenes`` renders 64×64 images of one coloured shape on a plain background with captions
("a small red circle on a white background"), deterministically from a seed. ``styles`` draws the
same scenes in looks the base model never sees (outlines, stripes, a fixed palette) and a mascot
character. ``analysis`` reads an image back: foreground colour and shape, by pixel analysis.
"""
