// The microphone's AudioWorklet: the first channel, resampled from the audio context's rate to
// the session's (24 kHz, /v1/realtime's audio/pcm) by linear interpolation, as 16-bit PCM posted
// to the page every 100 ms. The context runs at the device's own rate: asking the browser for
// 24 kHz instead fails in some browsers once a microphone of another rate is connected.
class PcmRecorder extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.target = options.processorOptions.rate;
    this.step = sampleRate / this.target; // input samples per output sample
    this.position = 0; // where the next output sample lies, in input samples from `previous`
    this.previous = 0; // the last input sample of the block before
    this.piece = new Int16Array(this.target / 10);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    // Sample i of this block sits at i + 1 from `previous`, which sits at 0.
    while (this.position <= input.length) {
      const at = Math.floor(this.position);
      const before = at === 0 ? this.previous : input[at - 1];
      const after = at < input.length ? input[at] : before;
      const value = before + (after - before) * (this.position - at);
      const clipped = Math.max(-1, Math.min(1, value));
      this.piece[this.filled++] = clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff;
      if (this.filled === this.piece.length) {
        this.port.postMessage(this.piece.buffer, [this.piece.buffer]);
        this.piece = new Int16Array(this.target / 10);
        this.filled = 0;
      }
      this.position += this.step;
    }
    this.position -= input.length;
    this.previous = input[input.length - 1];
    return true;
  }
}

registerProcessor("pcm-recorder", PcmRecorder);
