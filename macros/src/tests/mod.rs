//! Expansion snapshots (what the macro generates, for reviewers), property tests that the
//! expansion never panics whatever tokens it is given, and one on valid step bodies assembled
//! from pieces (loops, closures, `?`, early returns, nested blocks): the expansion parses, keeps
//! the user's function, and rewrites every guarded or protected form exactly once.

use proc_macro2::TokenStream;
use quote::quote;

use crate::guarded_step_impl;

mod bodies;
mod fuzz;

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
    (params = self.vs, on_nan = skip(max = 5)),
    fn update(&mut self, env: &mut Env) {
        let a = self.policy(env.observe());
        let r = env.step(&a);
        let loss = self.loss(&a, &r);
        self.opt.backward_step(&loss);
        self.scheduler.step();
    }
);

snapshot!(
    dynamic_loss_scaling,
    (loss_scale(init = 1024, interval = 100), sync = "deferred"),
    fn step(opt: &mut FusedOptimizer, net: &Net, x: &Tensor) {
        let loss = net.forward(x).mean(Kind::Float);
        opt.zero_grad();
        loss.backward();
        opt.step();
    }
);

snapshot!(
    spike_detection_and_rollback,
    (
        max_norm = 5,
        on_nan = "skip",
        spike(sigmas = 6, window = 50),
        rollback = 100
    ),
    fn step(opt: &mut nn::Optimizer, vs: &nn::VarStore, loss: &Tensor) {
        opt.backward_step(loss);
    }
);

snapshot!(
    process_group,
    (on_nan = "skip", group = pg),
    fn step(pg: &ProcessGroup, opt: &mut nn::Optimizer, vs: &nn::VarStore, loss: &Tensor) {
        opt.backward_step(loss);
    }
);

snapshot!(
    by_value_argument_is_not_replayed,
    (),
    fn step(batch: Vec<Tensor>, opt: &mut nn::Optimizer, mut k: usize) -> f64 {
        k += 1;
        let loss = batch[k].mean(Kind::Float);
        opt.backward_step(&loss);
        f64::try_from(loss).unwrap()
    }
);

snapshot!(
    replay_rebinds_mut_arguments,
    (checks = "loss,grads"),
    fn step<'a>(
        opt: &mut nn::Optimizer,
        xs: &'a [Tensor],
        mut k: usize,
    ) -> Result<&'a Tensor, TchError> {
        k += 1;
        let x = xs.get(k).ok_or(TchError::Kind(String::new()))?;
        opt.backward_step(&x.mean(Kind::Float));
        Ok(x)
    }
);

snapshot!(
    diagnose_off,
    (checks(list = "loss,grads,params", diagnose = "off")),
    fn step(opt: &mut nn::Optimizer, loss: &Tensor) {
        opt.backward_step(loss);
    }
);

snapshot!(
    invalid_configuration_keeps_the_function,
    (max_nrom = 5, protect(eps = 0)),
    fn step(opt: &mut nn::Optimizer, loss: &Tensor) {
        opt.backward_step(loss);
    }
);

/// The rustdoc of `guarded_step` lists every argument of the table, inside groups too.
#[test]
fn the_documentation_lists_every_argument() {
    let doc: String = include_str!("../lib.rs")
        .lines()
        .filter(|l| l.starts_with("/// |"))
        .collect::<Vec<_>>()
        .join("\n");
    for (group, arg) in crate::spec::all_args() {
        let written = match group {
            None => format!("`{}", arg.name),
            Some(g) => match crate::spec::ARGS
                .iter()
                .find(|a| a.name == g)
                .and_then(|a| a.group?.call)
            {
                Some(call) => format!("{g} = {call}("),
                None => format!("{g}("),
            },
        };
        assert!(doc.contains(&written), "{written} is not documented");
        if group.is_some() {
            assert!(
                doc.contains(&format!("{} = ", arg.name)),
                "{} is not documented",
                arg.name
            );
        }
    }
}

/// Which bodies become a closure that can run twice, and why the others do not.
#[test]
fn which_bodies_are_replayed() {
    let why = |item: TokenStream| {
        let out = guarded_step_impl(quote!(), item).to_string();
        let closure = out.contains(":: stepguard :: __private :: replay (");
        // The string literal of `Replay::off(..)`, as written in the tokens.
        let off = out.split("Replay :: off (").nth(1).map(|s| {
            let mut escaped = false;
            let end = s
                .char_indices()
                .skip(1)
                .find(|&(_, c)| {
                    let close = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map_or(s.len(), |(i, _)| i + 1);
            s[..end].to_string()
        });
        assert!(closure != off.is_some(), "{out}");
        off
    };
    let body = quote!({
        opt.backward_step(loss);
    });
    let off = |sig: TokenStream| why(quote!(#sig #body));
    for replayed in [
        quote!(fn f(opt: &mut O, loss: &T)),
        quote!(fn f(&mut self, opt: &mut O, loss: &T, n: usize, lr: f64, b: bool, _: Vec<T>)),
        quote!(fn f<'a>(opt: &mut O, loss: &'a T, mut k: core::primitive::u32) -> &'a T),
        quote!(fn f<'a>(&self, opt: &'a mut O, loss: &T) -> Result<&T, E>),
        quote!(fn f(opt: &mut O, loss: &T) -> &'static str),
        quote!(fn f(opt: &mut O, loss: &T) -> Box<dyn Fn(&mut T) -> &mut T>),
    ] {
        assert_eq!(off(replayed.clone()), None, "{replayed}");
    }
    for (sig, reason) in [
        (
            quote!(fn f(opt: &mut O, loss: T)),
            "the argument `loss` is taken by value",
        ),
        (
            quote!(fn f(self, opt: &mut O, loss: &T)),
            "the argument `self` is taken by value",
        ),
        (
            quote!(fn f(opt: &mut O, loss: &T, ref mut n: usize)),
            "the argument `n` is taken by value",
        ),
        (
            quote!(fn f(opt: &mut O, (loss, _): (&T, u8))),
            "the argument `(loss , _)` is taken by value",
        ),
        (
            quote!(fn f(opt: &mut O, loss: &T) -> impl Iterator<Item = f64>),
            "it returns `impl Trait`",
        ),
        (
            quote!(fn f(&mut self, opt: &O, loss: &T) -> &T),
            "it returns a borrow of a `&mut` argument",
        ),
        (
            quote!(fn f<'a>(opt: &'a mut O, loss: &T) -> Option<&'a O>),
            "it returns a borrow of a `&mut` argument",
        ),
        (
            quote!(fn f(opt: &mut O, loss: &T) -> std::cell::Ref<'_, T>),
            "it returns a borrow of a `&mut` argument",
        ),
    ] {
        assert_eq!(
            off(sig.clone()).as_deref(),
            Some(format!("{reason:?}").as_str()),
            "{sig}"
        );
    }
    let out = guarded_step_impl(
        quote!(checks(diagnose = "off")),
        quote!(fn f(opt: &mut O, loss: &T) #body),
    )
    .to_string();
    assert!(
        out.contains(r#"Replay :: off ("`checks(diagnose = \"off\")`")"#),
        "{out}"
    );
    assert!(
        !out.contains(":: stepguard :: __private :: replay ("),
        "{out}"
    );
}
