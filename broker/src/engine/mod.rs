//! The delivery-group engine (pure: inputs and `now` in, decisions and the next deadline out).
