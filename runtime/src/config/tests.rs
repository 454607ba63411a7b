use super::*;

/// The runtime's defaults are the table's: the attribute and a hand-built `Config` agree.
#[test]
fn defaults_are_the_tables() {
    let d = |id| spec::default_number(id);
    let c = Config::DEFAULT;
    assert_eq!(c.eps, d(Id::Eps));
    assert_eq!(c.norm_type.p(), d(Id::NormType));
    assert_eq!(f64::from(c.max_skips), d(Id::MaxSkips));
    let s = LossScale::DYNAMIC;
    assert_eq!(
        [
            s.init_scale,
            s.growth_factor,
            s.backoff_factor,
            f64::from(s.growth_interval),
            s.min_scale
        ],
        [
            d(Id::ScaleInit),
            d(Id::ScaleGrowth),
            d(Id::ScaleBackoff),
            d(Id::ScaleInterval),
            d(Id::ScaleMin)
        ]
    );
    let s = Spike::DEFAULT;
    assert_eq!(
        [s.sigmas, f64::from(s.warmup), f64::from(s.window)],
        [d(Id::SpikeSigmas), d(Id::SpikeWarmup), d(Id::SpikeWindow)]
    );
    let a = AdaptiveClip::DEFAULT;
    assert_eq!(
        [a.sigmas, f64::from(a.warmup), f64::from(a.window)],
        [
            d(Id::AdaptiveSigmas),
            d(Id::AdaptiveWarmup),
            d(Id::AdaptiveWindow)
        ]
    );
}

#[test]
fn validate_checks_the_tables_ranges_and_rules() {
    assert!(Config::DEFAULT.validate().is_ok());
    let bad = [
        Config::DEFAULT.with_max_norm(0.0),
        Config::DEFAULT.with_eps(-1.0),
        Config::DEFAULT.with_loss_scale(LossScale::new(8.0, 2.0, 0.5, 10, 16.0)),
        Config::DEFAULT.with_loss_scale(LossScale::new(8.0, 1.0, 0.5, 10, 1.0)),
        Config::DEFAULT.with_spike(Spike::new(6.0, 20, 1)),
        Config::DEFAULT.with_rollback(3),
        Config::DEFAULT
            .with_on_nan(OnNan::Skip)
            .with_rollback(3)
            .with_sync(SyncMode::Deferred),
        Config::DEFAULT
            .with_adaptive_clip(AdaptiveClip::DEFAULT)
            .with_sync(SyncMode::Deferred),
    ];
    for c in bad {
        assert!(c.validate().is_err(), "{c:?}");
    }
    let mut both = Config::DEFAULT.with_adaptive_clip(AdaptiveClip::DEFAULT);
    both.max_norm = Some(1.0);
    assert!(matches!(both.validate(), Err(ConfigError::AdaptiveClip)));
    assert!(matches!(
        Config::DEFAULT.with_rollback(3).validate(),
        Err(ConfigError::Rollback(3))
    ));
}
