"""``test_model_configuration``: are per-example gradients independent of batching?

``padding.py`` holds the measurement (pure torch), ``settings.py`` the escalating flag
settings, ``special_tokens.py`` the chat-template check, ``diagnose.py`` the driver.
"""
