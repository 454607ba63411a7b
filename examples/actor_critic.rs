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
    #[test]
    fn reward_improves_under_the_guard() {
        let (first, last) = super::run(150).unwrap();
        assert!(last > first, "{first} -> {last}");
    }
}
