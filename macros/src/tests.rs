//! Expansion snapshots (what the macro generates, for reviewers) and a property test that the
//! expansion never panics, whatever tokens it is given.

use proc_macro2::TokenStream;
use proptest::prelude::*;
use quote::quote;

use crate::guarded_step_impl;

fn pretty(tokens: TokenStream) -> String {
    match syn::parse2::<syn::File>(tokens.clone()) {
        Ok(file) => prettyplease::unparse(&file),
        Err(_) => tokens.to_string(),
    }
}

macro_rules! snapshot {
    ($name:ident, ($($attr:tt)*), $($item:tt)*) => {
        #[test]
        fn $name() {
            let out = guarded_step_impl(quote!($($attr)*), quote!($($item)*));
            insta::assert_snapshot!(stringify!($name), pretty(out));
        }
    };
}

snapshot!(
    explicit_step_with_clipping,
    (max_norm = 5, checks = "loss,grads,params"),
    fn train_step(
        opt: &mut nn::Optimizer,
        vs: &nn::VarStore,
        net: &Net,
        x: &Tensor,
        y: &Tensor,
    ) -> Tensor {
        let loss = -(y * net.forward(x).softmax(-1, Kind::Float).log()).sum(Kind::Float)
            / x.size()[0] as f64;
        opt.zero_grad();
        loss.backward();
        opt.step();
        loss
    }
);

snapshot!(
    backward_step_returning_result,
    (on_nan = "error", norm_type = "inf"),
    fn step(opt: &mut nn::Optimizer, loss: &Tensor) -> Result<(), TrainError> {
        opt.backward_step_clip_norm(loss, 1.0);
        Ok(())
    }
);

snapshot!(
    method_with_params_and_skip,
    (params = self.vs, on_nan = "skip", max_skips = 5),
    fn update(&mut self, env: &mut Env) {
        let a = self.policy(env.observe());
        let r = env.step(&a);
        let loss = self.loss(&a, &r);
        self.opt.backward_step(&loss);
        self.scheduler.step();
    }
);

snapshot!(
    invalid_configuration_keeps_the_function,
    (max_nrom = 5, eps = 0),
    fn step(opt: &mut nn::Optimizer, loss: &Tensor) {
        opt.backward_step(loss);
    }
);

/// Tokens a fuzzer would find interesting: the attribute's own vocabulary, Rust keywords,
/// punctuation, literals of every kind, and delimiters.
fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "max_norm",
            "norm_type",
            "checks",
            "eps",
            "protect",
            "on_nan",
            "max_skips",
            "params",
            "fn",
            "const",
            "async",
            "struct",
            "impl",
            "self",
            "Self",
            "opt",
            "loss",
            "step",
            "backward",
            "backward_step",
            "div",
            "log",
            "return",
            "where",
            "mut",
            "let",
            "match",
            "move",
            "Result",
            "Tensor",
            "VarStore",
            "_",
        ])
        .prop_map(str::to_string),
        prop::sample::select(vec![
            "=", ",", ".", ";", ":", "::", "->", "=>", "&", "&mut", "/", "/=", "-", "?", "!", "#",
            "<", ">", "|", "'a", "(", ")", "{", "}", "[", "]",
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        "[a-z_]{1,8}",
        "\"[a-z,]{0,12}\"",
    ]
}

fn tokens(max: usize) -> impl Strategy<Value = Option<TokenStream>> {
    prop::collection::vec(atom(), 0..max).prop_map(|v| v.join(" ").parse::<TokenStream>().ok())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_arbitrary_tokens(attr in tokens(12), item in tokens(40)) {
        if let (Some(attr), Some(item)) = (attr, item) {
            let _ = guarded_step_impl(attr, item);
        }
    }

    #[test]
    fn never_panics_on_arbitrary_bodies(attr in tokens(8), body in tokens(40)) {
        if let (Some(attr), Some(body)) = (attr, body) {
            let item = quote!(fn step(opt: &mut Optimizer, vs: &VarStore) -> Result<(), E> { #body });
            let _ = guarded_step_impl(attr, item);
        }
    }

    #[test]
    fn user_function_survives_bad_attributes(attr in tokens(12)) {
        if let Some(attr) = attr {
            let item = quote!(fn keep_me(opt: &mut Optimizer, l: &Tensor) { opt.backward_step(l); });
            let out = guarded_step_impl(attr, item).to_string();
            prop_assert!(out.contains("keep_me"));
        }
    }
}
