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
