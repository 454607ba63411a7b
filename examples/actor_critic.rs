//! An actor-critic agent: the update is a method on `&mut self` with both optimizers in
//! fields, and the body also calls `env.step(action)`, which the guard leaves alone.
//!
//! A two-armed bandit-like task: the reward is higher for the action matching the sign of the
//! observation; `cargo run --example actor_critic`.

#![allow(clippy::result_large_err)] // GuardError is returned once, on failure

use stepguard::{guarded_step, GuardError};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// The environment: `step(action)` returns the reward (not an optimizer step).
struct Env {
    obs: Tensor,
    steps: usize,
}

impl Env {
    fn observe(&mut self) -> Tensor {
        self.obs = Tensor::randn([32, 4], (Kind::Float, Device::Cpu));
        self.obs.shallow_clone()
    }
    fn step(&mut self, action: &Tensor) -> Tensor {
        self.steps += 1;
        let target = self.obs.narrow(1, 0, 1).sign().squeeze_dim(1);
        -(action - target).square()
    }
}

struct Agent {
    actor_vs: nn::VarStore,
    critic_vs: nn::VarStore,
    actor: nn::Sequential,
    critic: nn::Sequential,
    actor_opt: nn::Optimizer,
    critic_opt: nn::Optimizer,
}

impl Agent {
    fn new() -> Self {
        let (actor_vs, critic_vs) = (
            nn::VarStore::new(Device::Cpu),
            nn::VarStore::new(Device::Cpu),
        );
        let head = |vs: &nn::VarStore, name: &str| {
            let p = vs.root() / name;
            nn::seq()
                .add(nn::linear(&p / "l1", 4, 16, Default::default()))
                .add_fn(|x| x.tanh())
                .add(nn::linear(&p / "l2", 16, 1, Default::default()))
        };
        let (actor, critic) = (head(&actor_vs, "actor"), head(&critic_vs, "critic"));
        let actor_opt = nn::Adam::default().build(&actor_vs, 1e-2).unwrap();
        let critic_opt = nn::Adam::default().build(&critic_vs, 1e-2).unwrap();
        Agent {
            actor_vs,
            critic_vs,
            actor,
            critic,
            actor_opt,
            critic_opt,
        }
    }

    /// One update of both heads; on NaN it returns the error so the caller can checkpoint.
    #[guarded_step(params = (&self.actor_vs, &self.critic_vs), on_nan = "error", max_norm = 2)]
    fn update(&mut self, env: &mut Env) -> Result<f64, GuardError> {
        let obs = env.observe();
        let action = self.actor.forward(&obs).tanh().squeeze_dim(1);
        let noisy = &action + Tensor::randn_like(&action) * 0.3;
        let reward = env.step(&noisy.detach());
        let value = self.critic.forward(&obs).squeeze_dim(1);
        let critic_loss = (&reward - &value).square().mean(Kind::Float);
        self.critic_opt.backward_step(&critic_loss);
        let advantage = (&reward - value.detach()).detach();
        let log_prob = -(&noisy.detach() - &action).square() / 0.18;
        let actor_loss = -(log_prob * advantage).mean(Kind::Float);
        self.actor_opt.zero_grad();
        actor_loss.backward();
        self.actor_opt.step();
        Ok(f64::try_from(reward.mean(Kind::Float)).unwrap())
    }
}

/// Trains for `steps`; returns the mean reward of the first and last 10 steps.
pub fn run(steps: usize) -> Result<(f64, f64), GuardError> {
    tch::manual_seed(0);
    let mut agent = Agent::new();
    let mut env = Env {
        obs: Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        steps: 0,
    };
    let mut rewards = Vec::new();
    for _ in 0..steps {
        rewards.push(agent.update(&mut env)?);
    }
    assert_eq!(env.steps, steps, "env.step(action) ran once per update");
    let k = 10.min(steps);
    let mean = |r: &[f64]| r.iter().sum::<f64>() / r.len() as f64;
    Ok((mean(&rewards[..k]), mean(&rewards[steps - k..])))
}

fn main() -> Result<(), GuardError> {
    let (first, last) = run(300)?;
    println!(
        "actor-critic: mean reward {first:.3} -> {last:.3}\n\n{}",
        stepguard::report()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stepguard_suite::{all_finite, serial, var_bits};

    impl Agent {
        /// `update` without the attribute, with its clipping (`max_norm = 2`) written out:
        /// each optimizer's global grad norm clipped to 2 before its step.
        fn update_plain(&mut self, env: &mut Env) -> Result<f64, GuardError> {
            let clip = |opt: &nn::Optimizer| {
                let _ = stepguard::clip_grad_norm(opt.trainable_variables(), 2.0, 2).unwrap();
            };
            let obs = env.observe();
            let action = self.actor.forward(&obs).tanh().squeeze_dim(1);
            let noisy = &action + Tensor::randn_like(&action) * 0.3;
            let reward = env.step(&noisy.detach());
            let value = self.critic.forward(&obs).squeeze_dim(1);
            let critic_loss = (&reward - &value).square().mean(Kind::Float);
            self.critic_opt.zero_grad();
            critic_loss.backward();
            clip(&self.critic_opt);
            self.critic_opt.step();
            let advantage = (&reward - value.detach()).detach();
            let log_prob = -(&noisy.detach() - &action).square() / 0.18;
            let actor_loss = -(log_prob * advantage).mean(Kind::Float);
            self.actor_opt.zero_grad();
            actor_loss.backward();
            clip(&self.actor_opt);
            self.actor_opt.step();
            Ok(f64::try_from(reward.mean(Kind::Float)).unwrap())
        }
    }

    #[test]
    fn reward_improves_under_the_guard() {
        let _serial = serial(); // `run` seeds and draws from tch's global generator
        let (first, last) = super::run(150).unwrap();
        assert!(last > first, "{first} -> {last}");
    }

    fn env() -> Env {
        Env {
            obs: Tensor::zeros([1], (Kind::Float, Device::Cpu)),
            steps: 0,
        }
    }

    #[test]
    fn guarded_update_is_the_plain_one_and_returns_the_error_on_a_nan_critic() {
        let _serial = serial(); // both runs must draw the same observations and noise
        tch::manual_seed(5); // the initial weights
        let mut plain = Agent::new();
        let mut guarded = Agent::new();
        guarded.actor_vs.copy(&plain.actor_vs).unwrap();
        guarded.critic_vs.copy(&plain.critic_vs).unwrap();
        let (mut env_p, mut env_g) = (env(), env());
        let site = stepguard::registry()
            .find(|s| s.name() == "update")
            .expect("registered");
        let clipped = site.stats().clipped;
        for i in 0..5 {
            tch::manual_seed(100 + i);
            let p = plain.update_plain(&mut env_p).unwrap();
            tch::manual_seed(100 + i);
            let g = guarded.update(&mut env_g).unwrap();
            assert_eq!(p.to_bits(), g.to_bits(), "same mean reward");
        }
        assert!(
            site.stats().clipped > clipped,
            "clipping engaged: compared with it by hand"
        );
        assert_eq!(env_g.steps, 5, "env.step(action) ran once per update");
        assert_eq!(var_bits(&plain.actor_vs), var_bits(&guarded.actor_vs));
        assert_eq!(var_bits(&plain.critic_vs), var_bits(&guarded.critic_vs));

        // A NaN in the critic's weights: the update returns the error before either head
        // moves, naming the tensor.
        for agent in [&plain, &guarded] {
            tch::no_grad(|| {
                let _ = agent.critic_vs.variables()["critic.l1.weight"]
                    .narrow(0, 0, 1)
                    .fill_(f64::NAN);
            });
        }
        let before = (var_bits(&guarded.actor_vs), var_bits(&guarded.critic_vs));
        tch::manual_seed(200);
        let err = guarded.update(&mut env_g).unwrap_err();
        assert_eq!(err.function, "update");
        assert!(err.to_string().contains("critic.l1.weight"), "{err}");
        assert_eq!(
            before,
            (var_bits(&guarded.actor_vs), var_bits(&guarded.critic_vs))
        );
        // Without the guard the update "succeeds" and spreads the NaN to the actor.
        tch::manual_seed(200);
        let reward = plain.update_plain(&mut env_p).unwrap();
        assert!(reward.is_finite());
        assert!(
            !all_finite(&plain.actor_vs),
            "the plain update corrupts the actor"
        );
    }
}
